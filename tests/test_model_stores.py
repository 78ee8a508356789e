"""--model finds the models people already have (Ollama, LM Studio, the Hugging Face cache) and
`p2pllm models` lists them. Every store is built in a temporary HOME with the real layout: Ollama
manifests and content-addressed blobs, LM Studio's publisher/repo tree, the HF cache's blobs,
refs and symlinked snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_MODELS
from p2pllm.cli import build_parser
from p2pllm.model.store import ModelRefError, list_models, resolve_model

STORE_ENV = ("OLLAMA_MODELS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
COMMIT_A = "3f1c9a2b7d5e4c6a8b0d2e4f6a8c0e2b4d6f8a0c"  # snapshot folders are named by 40-hex commit
COMMIT_B = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d"


# --------------------------------------------------------------------------- the stores, as the tools write them


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ollama_add(root: Path, manifest_parts: tuple[str, str, str, str], model: Path | None) -> Path:
    """Ollama's layout: blobs/sha256-<hex> (the GGUF, no extension) and a manifest under
    manifests/<host>/<namespace>/<name>/<tag> pointing at it by digest. `model=None`: a manifest
    whose model blob was deleted."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    if model is not None:
        digest = _sha256(model)
        shutil.copyfile(model, blobs / f"sha256-{digest}")
        layers.append({"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                       "size": model.stat().st_size})
    else:
        layers.append({"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "0" * 64, "size": 1})
    for media, content in (("template", b"{{ .Prompt }}"), ("params", b'{"stop": ["</s>"]}')):
        digest = hashlib.sha256(content).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(content)
        layers.append({"mediaType": f"application/vnd.ollama.image.{media}", "digest": f"sha256:{digest}",
                       "size": len(content)})
    config = b'{"model_format":"gguf","model_family":"llama"}'
    config_digest = hashlib.sha256(config).hexdigest()
    (blobs / f"sha256-{config_digest}").write_bytes(config)
    manifest = root / "manifests" / Path(*manifest_parts)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{config_digest}", "size": len(config)},
        "layers": layers}))
    return blobs / f"sha256-{_sha256(model)}" if model is not None else manifest


def lmstudio_add(root: Path, publisher: str, repo: str, files: dict[str, Path | bytes]) -> Path:
    folder = root / publisher / repo
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        if isinstance(src, bytes):
            (folder / name).write_bytes(src)
        else:
            shutil.copyfile(src, folder / name)
    return folder


def hf_add(hub: Path, repo_id: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> Path:
    """The hub cache: models--ORG--NAME/blobs/<hash>, snapshots/<commit>/<file> as relative symlinks
    into blobs/, refs/<name> holding the commit hash."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for rel, src in files.items():
        digest = _sha256(src)
        if not (repo / "blobs" / digest).exists():
            shutil.copyfile(src, repo / "blobs" / digest)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def hf_folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def small_gguf(demo_tiny_gguf) -> Path:
    """stories260K (a trained model) where the shared models are, else the seeded-random demo model."""
    stories = SHARED_MODELS / "stories260K.gguf"
    return stories if stories.exists() else demo_tiny_gguf


@pytest.fixture(scope="session")
def q8_gguf(tmp_path_factory) -> Path:
    from p2pllm.model.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("q8") / "tiny-q8_0.gguf", "gguf", "tiny", qtype="q8_0")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty HOME with no store variables set (os.environ is what subprocesses get too)."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for var in STORE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return h


@pytest.fixture
def stores(home, small_gguf, q8_gguf, demo_tiny_hf) -> dict[str, Path]:
    """All three stores filled; returns the paths each name should resolve to."""
    ollama = home / ".ollama" / "models"
    lms = home / ".lmstudio" / "models"
    hub = home / ".cache" / "huggingface" / "hub"
    reg = "registry.ollama.ai"
    out = {
        "ollama_latest": ollama_add(ollama, (reg, "library", "stories", "latest"), small_gguf),
        "ollama_q8": ollama_add(ollama, (reg, "library", "stories", "q8"), q8_gguf),
        "ollama_ns": ollama_add(ollama, (reg, "someone", "tiny", "v1"), q8_gguf),
        "ollama_hf": ollama_add(ollama, ("hf.co", "org", "Tiny-GGUF", "Q8_0"), q8_gguf),
        "ollama_broken": ollama_add(ollama, (reg, "library", "gone", "latest"), None),
        "lms_one": lmstudio_add(lms, "pub", "one", {"one-Q8_0.gguf": q8_gguf, "mmproj-one-F16.gguf": q8_gguf}),
        "lms_two": lmstudio_add(lms, "pub", "two", {"two-Q8_0.gguf": q8_gguf, "two-F32.gguf": small_gguf}),
        "lms_old": lmstudio_add(home / ".cache" / "lm-studio" / "models", "old", "repo", {"m.gguf": small_gguf}),
        "lms_bad": lmstudio_add(lms, "pub", "truncated", {"t.gguf": q8_gguf.read_bytes()[:3000]}),
        "hf_main": hf_add(hub, "org/tiny", COMMIT_A, hf_folder_files(demo_tiny_hf)),
        "hf_v2": hf_add(hub, "org/tiny", COMMIT_B, hf_folder_files(demo_tiny_hf), refs=("v2",)),
        "hf_gguf": hf_add(hub, "org/stories-GGUF", COMMIT_A, {"stories.Q8_0.gguf": small_gguf}),
        "hf_multi": hf_add(hub, "org/multi-GGUF", COMMIT_A, {"m-F32.gguf": small_gguf, "Q8/m-Q8_0.gguf": q8_gguf}),
    }
    return out


# --------------------------------------------------------------------------- resolving


def test_ollama_names_tag_default_namespace_host_and_case(stores):
    assert resolve_model("stories") == str(stores["ollama_latest"])
    assert resolve_model("stories:latest") == str(stores["ollama_latest"])
    assert resolve_model("stories:q8") == str(stores["ollama_q8"])
    assert resolve_model("Stories:Q8") == str(stores["ollama_q8"])  # Ollama names are case-insensitive
    assert resolve_model("someone/tiny:v1") == str(stores["ollama_ns"])
    assert resolve_model("hf.co/org/Tiny-GGUF:Q8_0") == str(stores["ollama_hf"])
    assert resolve_model("ollama:stories").ref == "ollama:stories"
    assert Path(resolve_model("stories")).name.startswith("sha256-")


def test_ollama_models_env_replaces_the_default_root(stores, home, tmp_path, monkeypatch, small_gguf):
    other = tmp_path / "elsewhere"
    blob = ollama_add(other, ("registry.ollama.ai", "library", "only-here", "latest"), small_gguf)
    monkeypatch.setenv("OLLAMA_MODELS", str(other))
    assert resolve_model("only-here") == str(blob)
    with pytest.raises(ModelRefError) as e:
        resolve_model("stories:q8")  # in ~/.ollama, which OLLAMA_MODELS replaces
    assert str(other) in str(e.value) and str(home / ".ollama") not in str(e.value)


def test_ollama_manifest_without_its_blob_is_one_clear_error(stores):
    with pytest.raises(ModelRefError, match=r"gone:latest \(ollama, .*\): its model blob .*sha256-0{64} is missing"):
        resolve_model("gone")


def test_lmstudio_publisher_repo_single_file_ambiguous_and_file_forms(stores):
    assert resolve_model("pub/one") == str(stores["lms_one"] / "one-Q8_0.gguf")  # the mmproj file is not a model
    assert resolve_model("pub/two/two-F32.gguf") == str(stores["lms_two"] / "two-F32.gguf")
    assert resolve_model("old/repo") == str(stores["lms_old"] / "m.gguf")  # the pre-0.3 ~/.cache/lm-studio
    with pytest.raises(ModelRefError) as e:
        resolve_model("pub/two")
    msg = str(e.value)
    assert "\n" not in msg and "matches 2 models in LM Studio" in msg
    assert "pub/two/two-F32.gguf" in msg and "pub/two/two-Q8_0.gguf" in msg


def test_hf_cache_default_ref_named_ref_commit_prefix_and_files(stores):
    assert resolve_model("org/tiny") == str(stores["hf_main"])  # refs/main
    assert resolve_model("org/tiny@main") == str(stores["hf_main"])
    assert resolve_model("org/tiny@v2") == str(stores["hf_v2"])  # another ref
    assert resolve_model(f"org/tiny@{COMMIT_B}") == str(stores["hf_v2"])  # a commit hash
    assert resolve_model(f"hf:org/tiny@{COMMIT_B[:10]}") == str(stores["hf_v2"])  # a unique prefix of one
    assert resolve_model("org/stories-GGUF") == str(stores["hf_gguf"] / "stories.Q8_0.gguf")
    assert resolve_model("org/multi-GGUF/Q8/m-Q8_0.gguf") == str(stores["hf_multi"] / "Q8" / "m-Q8_0.gguf")
    assert Path(resolve_model("org/tiny")).is_dir() and (stores["hf_main"] / "config.json").is_symlink()
    with pytest.raises(ModelRefError, match=r"no revision 'v9' \(refs: main, v2; snapshots: "):
        resolve_model("org/tiny@v9")
    with pytest.raises(ModelRefError, match=r"matches 2 models in the Hugging Face cache: "
                                            r"org/multi-GGUF/Q8/m-Q8_0.gguf, org/multi-GGUF/m-F32.gguf"):
        resolve_model("org/multi-GGUF")


def test_hf_cache_root_follows_hf_hub_cache_then_hf_home(home, tmp_path, monkeypatch, demo_tiny_hf):
    a = hf_add(tmp_path / "hubcache", "org/m", COMMIT_A, hf_folder_files(demo_tiny_hf), refs=())  # only snapshot
    b = hf_add(tmp_path / "hfhome" / "hub", "org/m", COMMIT_B, hf_folder_files(demo_tiny_hf))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert resolve_model("org/m") == str(b)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert resolve_model("org/m") == str(a)


def test_a_name_in_two_stores_is_ambiguous_and_a_prefix_picks_one(home, q8_gguf):
    lms = lmstudio_add(home / ".lmstudio" / "models", "org", "x", {"x.gguf": q8_gguf})
    snap = hf_add(home / ".cache" / "huggingface" / "hub", "org/x", COMMIT_A, {"x.gguf": q8_gguf})
    with pytest.raises(ModelRefError, match=r"'org/x' matches 2 models: lmstudio:org/x, hf:org/x; pass one"):
        resolve_model("org/x")
    assert resolve_model("lmstudio:org/x") == str(lms / "x.gguf")
    assert resolve_model("hf:org/x") == str(snap / "x.gguf")
    assert sorted(m.name for m in list_models()) == ["hf:org/x", "lmstudio:org/x"]


def test_an_existing_path_wins_over_the_stores(stores, tmp_path, q8_gguf):
    with pytest.raises(ModelRefError, match="empty model name"):
        resolve_model(" ")
    (tmp_path / "pub").mkdir()
    shutil.copyfile(q8_gguf, tmp_path / "pub" / "one")  # a file that is also an LM Studio name
    assert resolve_model("pub/one") == "pub/one"
    assert resolve_model(str(q8_gguf)) == str(q8_gguf)


def test_not_found_names_every_place_looked(stores, home):
    with pytest.raises(ModelRefError) as e:
        resolve_model("acme/nothing")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no model 'acme/nothing': no file or folder ")
    for place in ("manifests/registry.ollama.ai/acme/nothing/latest", str(home / ".ollama" / "models"),
                  str(home / ".lmstudio" / "models"), str(home / ".cache" / "lm-studio" / "models"),
                  "models--acme--nothing", str(home / ".cache" / "huggingface" / "hub")):
        assert place in msg, (place, msg)


# --------------------------------------------------------------------------- the --model arguments


def _parse_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_every_model_argument_resolves_store_names(stores, capsys):
    parse = build_parser().parse_args
    assert parse(["run", "--model", "stories", "--prompt", "x"]).model == str(stores["ollama_latest"])
    joined = parse(["join", "--model", "org/tiny"])
    assert joined.model == str(stores["hf_main"]) and joined.model.ref == "org/tiny"
    assert parse(["check-model", "pub/one"]).path == str(stores["lms_one"] / "one-Q8_0.gguf")
    assert parse(["demo", "--model", "stories:q8"]).model == str(stores["ollama_q8"])
    assert parse(["demo"]).model is None
    assert parse(["plan", "--model", "stories:q8", "--discover"]).model == str(stores["ollama_q8"])
    assert parse(["plan", "--model", "llama-3-8b", "--discover"]).model == "llama-3-8b"  # built-in shapes first
    line = _parse_error(capsys, ["plan", "--model", "nope", "--discover"])
    assert line.startswith("p2pllm plan: error: argument --model: no model 'nope'") and "no built-in shape" in line
    line = _parse_error(capsys, ["check-model", "pub/two"])
    assert line.startswith("p2pllm check-model: error: argument path: 'pub/two' matches 2 models")


def test_run_with_an_unknown_name_is_one_error_line_exit_2(home):
    proc = subprocess.run([sys.executable, "-m", "p2pllm", "run", "--model", "llama3.2:1b", "--prompt", "hi"],
                          capture_output=True, text=True, cwd=REPO, env=os.environ.copy(), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("p2pllm run: error: argument --model: no model 'llama3.2:1b'")
    assert str(home / ".ollama" / "models") in errors[0]
    assert "manifests/registry.ollama.ai/library/llama3.2/1b" in errors[0]


# --------------------------------------------------------------------------- p2pllm models


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pllm", *args], capture_output=True, text=True, cwd=REPO,
                          env=os.environ.copy(), timeout=120, check=False)


def test_models_json_lists_every_store_with_its_facts(stores, small_gguf, demo_tiny_hf):
    proc = _cli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {
        "stories:latest", "stories:q8", "someone/tiny:v1", "hf.co/org/Tiny-GGUF:Q8_0", "gone:latest",
        "pub/one", "pub/two/two-F32.gguf", "pub/two/two-Q8_0.gguf", "pub/truncated", "old/repo",
        "org/tiny", "org/tiny@v2", "org/stories-GGUF", "org/multi-GGUF/m-F32.gguf", "org/multi-GGUF/Q8/m-Q8_0.gguf"}
    for r in rows.values():
        assert set(r) == {"name", "source", "format", "arch", "quantization", "size", "path", "error"}
        if r["error"] is None:  # every listed name resolves to the listed path
            assert resolve_model(r["name"]) == r["path"], r
    small_quant = "F32"  # stories260K has no general.file_type: its dominant tensor type; the demo model is ALL_F32
    assert rows["stories:latest"] == {
        "name": "stories:latest", "source": "ollama", "format": "gguf", "arch": "llama", "quantization": small_quant,
        "size": small_gguf.stat().st_size, "path": str(stores["ollama_latest"]), "error": None}
    assert rows["stories:q8"]["quantization"] == "Q8_0"
    assert (rows["pub/one"]["source"], rows["pub/one"]["quantization"]) == ("lmstudio", "Q8_0")
    tiny = rows["org/tiny"]
    assert (tiny["source"], tiny["format"], tiny["arch"]) == ("huggingface", "hf", "llama")
    assert tiny["quantization"] == "float32"
    assert tiny["size"] == sum(p.stat().st_size for p in demo_tiny_hf.glob("*.safetensors"))
    assert "sha256-" + "0" * 64 in rows["gone:latest"]["error"]
    assert rows["pub/truncated"]["error"] and rows["pub/truncated"]["quantization"] is None


def _models(*argv: str) -> int:
    args = build_parser().parse_args(["models", *argv])
    return args.func(args)


def test_models_table_and_nothing_found(stores, home, capsys):
    assert _models() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "FORMAT", "ARCH", "QUANT", "SIZE", "PATH"]
    row = next(line for line in lines if line.startswith("org/tiny "))
    assert row.split()[:5] == ["org/tiny", "huggingface", "hf", "llama", "float32"] and " MiB " in row
    truncated = lines.index(next(line for line in lines if line.startswith("pub/truncated ")))
    assert lines[truncated + 1].startswith("    error: ")
    shutil.rmtree(home)
    home.mkdir()
    assert _models() == 0
    out, err = capsys.readouterr()
    assert out.startswith("no models found; looked in Ollama: ") and len(out.splitlines()) == 1 and err == ""
    assert str(home / ".lmstudio" / "models") + " (absent)" in out
    assert _models("--json") == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == [] and err.startswith("no models found; looked in ")


# --------------------------------------------------------------------------- end to end


def test_run_by_store_name_generates_what_the_file_does(stores, small_gguf, demo_tiny_hf):
    """`p2pllm run --model NAME` on an Ollama name and an HF id, against the same files by path."""
    cases = {"stories": small_gguf, "org/tiny": demo_tiny_hf}
    argv = ["--prompt", "Once upon a time", "--max-tokens", "4", "--json", "--threads", "1"]  # 4 at once
    procs = {model: subprocess.Popen([sys.executable, "-m", "p2pllm", "run", "--model", str(model), *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=os.environ.copy())
             for model in [*cases, *cases.values()]}
    out = {}
    for model, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, (model, stderr)
        out[model] = json.loads(stdout)
    for name, path in cases.items():
        assert out[name]["ids"] == out[path]["ids"] and len(out[name]["ids"]) == 4, name
        assert out[name]["prompt_ids"] == out[path]["prompt_ids"]
