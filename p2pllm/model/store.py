"""Find the models people already have: Ollama's store, LM Studio's models folder, the Hugging Face cache.

Offline only: this reads folders and never downloads. `resolve_model(text)` turns what was typed after
`--model` into the path the rest of p2pllm reads; `list_models()` is everything the stores hold (for
`p2pllm models`). The names and matching rules are documented in docs/model-files.md, "Model stores".
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError

OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
# prefix -> source: `hf:org/name` picks one store when a name is in more than one
PREFIXES = {"ollama": "ollama", "lmstudio": "lmstudio", "hf": "huggingface"}
_PREFIX_OF = {source: prefix for prefix, source in PREFIXES.items()}
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one name segment (Ollama, LM Studio, HF ids alike)
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


class ModelRefError(UsageError):
    """A --model value that names no model (`not_found`), or more than one, or a broken one; one line."""

    def __init__(self, message: str, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found


class ModelPath(str):
    """A resolved --model value: the path, which remembers what was typed (`ref`), e.g. to print a
    `p2pllm join --model` line another machine can use."""

    ref: str

    def __new__(cls, path: str | os.PathLike, ref: str):
        s = super().__new__(cls, os.fspath(path))
        s.ref = ref
        return s


@dataclass(frozen=True)
class StoreModel:
    name: str  # what to pass to --model
    source: str  # ollama | lmstudio | huggingface
    format: str  # gguf | hf
    path: Path
    error: str = ""  # why the entry cannot be used (missing blob, no weights, ...), else empty


class _Broken(Exception):
    """A store entry that exists but cannot be used; becomes StoreModel.error."""


# --------------------------------------------------------------------------- where the stores are


def ollama_roots() -> list[Path]:
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return [Path(env).expanduser()]
    roots = [Path.home() / ".ollama" / "models"]
    if sys.platform.startswith("linux"):  # the Linux installer's service runs as user `ollama`
        roots.append(Path("/usr/share/ollama/.ollama/models"))
    return roots


def lmstudio_roots() -> list[Path]:
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]  # current, then pre-0.3


def hf_hub_root() -> Path:
    """The hub cache as huggingface_hub finds it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def _places(roots: list[Path]) -> str:
    return ", ".join(f"{r}{'' if r.is_dir() else ' (absent)'}" for r in roots)


def searched_places() -> str:
    """Every folder the stores are looked for in, for 'nothing found' lines."""
    return (f"Ollama: {_places(ollama_roots())}; LM Studio: {_places(lmstudio_roots())}; "
            f"Hugging Face cache: {_places([hf_hub_root()])}")


# --------------------------------------------------------------------------- resolving --model


def resolve_model(text: str) -> ModelPath:
    """An existing file or folder as given; else the one store model `text` names."""
    if not text.strip():
        raise ModelRefError("empty model name (give a path or a name from `p2pllm models`)")
    path = Path(text).expanduser()
    if path.exists():
        return ModelPath(path, text)
    prefix, sep, rest = text.partition(":")
    sources, ref = ([PREFIXES[prefix]], rest) if sep and prefix in PREFIXES else (list(_FINDERS), text)
    found: list[StoreModel] = []
    looked = [f"no file or folder {path.absolute()}"]
    for source in sources:
        result = _FINDERS[source](ref)
        if result is not None:  # None: `ref` is not a name this store could hold
            found += result[0]
            looked.append(result[1])
    if len(found) == 1:
        m = found[0]
        if m.error:
            raise ModelRefError(f"{m.name} ({m.source}, {m.path}): {m.error}")
        return ModelPath(m.path, text)
    if found:
        several = len({m.source for m in found}) > 1
        names = ", ".join(f"{_PREFIX_OF[m.source]}:{m.name}" if several else m.name for m in found)
        where = "" if several else f" in {_source_title(found[0].source)}"
        raise ModelRefError(f"{text!r} matches {len(found)} models{where}: {names}; pass one of these names")
    raise ModelRefError(f"no model {text!r}: " + "; ".join(looked), not_found=True)


def list_models() -> list[StoreModel]:
    """Every model in every store; a name found in two stores is given its store's prefix."""
    models = _ollama_list() + _lmstudio_list() + _hf_list()
    seen: dict[str, int] = {}
    for m in models:
        seen[m.name] = seen.get(m.name, 0) + 1
    return [replace(m, name=f"{_PREFIX_OF[m.source]}:{m.name}") if seen[m.name] > 1 else m for m in models]


def _source_title(source: str) -> str:
    return {"ollama": "Ollama", "lmstudio": "LM Studio", "huggingface": "the Hugging Face cache"}[source]


def _valid(parts: list[str]) -> bool:
    return bool(parts) and all(_PART.fullmatch(p) for p in parts)


# --------------------------------------------------------------------------- model folders


def _folder_models(folder: Path, name: str, source: str, suffix: str = "", file: str | None = None) -> list[StoreModel]:
    """The models in an LM Studio folder or a Hugging Face snapshot: its .gguf files (named NAME when
    there is one, NAME/FILE.gguf each when there are several), else the folder itself when it is a
    Hugging Face model folder. Vision projectors (mmproj*.gguf) are not models of their own."""
    if file is not None:
        p = folder / file
        return [StoreModel(f"{name}/{file}{suffix}", source, "gguf", p)] if p.is_file() else []
    ggufs = sorted(p for p in folder.rglob("*.gguf") if p.is_file() and not p.name.lower().startswith("mmproj"))
    if len(ggufs) == 1:
        return [StoreModel(name + suffix, source, "gguf", ggufs[0])]
    if ggufs:
        return [StoreModel(f"{name}/{p.relative_to(folder).as_posix()}{suffix}", source, "gguf", p) for p in ggufs]
    if (folder / "config.json").is_file():
        error = "" if any(folder.glob("*.safetensors")) else "config.json but no .safetensors weights"
        return [StoreModel(name + suffix, source, "hf", folder, error)]
    return [StoreModel(name + suffix, source, "gguf", folder, "no .gguf file and no config.json")]


# --------------------------------------------------------------------------- Ollama


def _ollama_parse(ref: str) -> tuple[str, str, str, str] | None:
    """(host, namespace, name, tag) of NAME[:TAG], NAMESPACE/NAME[:TAG] or HOST/NAMESPACE/NAME[:TAG]."""
    body, tag = ref, "latest"
    if ":" in ref.rsplit("/", 1)[-1]:
        body, tag = ref.rsplit(":", 1)
    parts = body.split("/")
    if not _valid(parts) or not 1 <= len(parts) <= 3 or not _PART.fullmatch(tag) or body.endswith((".gguf", ".json")):
        return None
    host, ns = OLLAMA_REGISTRY, "library"
    if len(parts) == 3:
        host, ns = parts[0], parts[1]
    elif len(parts) == 2:
        ns = parts[0]
    return host, ns, parts[-1], tag


def _ollama_name(host: str, ns: str, name: str, tag: str) -> str:
    base = (name if ns == "library" else f"{ns}/{name}") if host == OLLAMA_REGISTRY else f"{host}/{ns}/{name}"
    return f"{base}:{tag}"


def _ollama_blob(root: Path, manifest: Path) -> Path:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layers = data["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except StopIteration:
        raise _Broken(f"manifest {manifest} has no model layer ({OLLAMA_MODEL_LAYER})") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _Broken(f"manifest {manifest} is not a readable Ollama manifest ({type(e).__name__})") from None
    algo, _, hexd = str(digest).partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise _Broken(f"manifest {manifest}: unexpected digest {str(digest)[:80]!r}")
    for blob in (root / "blobs" / f"sha256-{hexd}", root / "blobs" / f"sha256:{hexd}"):  # old Ollama used ':'
        if blob.is_file():
            return blob
    raise _Broken(f"its model blob {root / 'blobs' / f'sha256-{hexd}'} is missing")


def _ollama_entry(root: Path, manifest: Path, name: str) -> StoreModel:
    try:
        return StoreModel(name, "ollama", "gguf", _ollama_blob(root, manifest))
    except _Broken as e:
        return StoreModel(name, "ollama", "gguf", manifest, str(e))


def _ollama_manifests(root: Path) -> list[tuple[Path, tuple[str, str, str, str]]]:
    base = root / "manifests"
    if not base.is_dir():
        return []
    return [(m, tuple(m.relative_to(base).parts)) for m in sorted(base.glob("*/*/*/*")) if m.is_file()]


def _ollama_find(ref: str):
    parsed = _ollama_parse(ref)
    if parsed is None:
        return None
    rel = Path("manifests", *parsed)
    name = _ollama_name(*parsed)
    for root in ollama_roots():  # the first root that has it wins
        if (root / rel).is_file():
            return [_ollama_entry(root, root / rel, name)], ""
        wanted = tuple(p.lower() for p in parsed)  # Ollama treats names case-insensitively
        for manifest, parts in _ollama_manifests(root):
            if tuple(p.lower() for p in parts) == wanted:
                return [_ollama_entry(root, manifest, _ollama_name(*parts))], ""
    return [], f"Ollama: no {rel.as_posix()} in {_places(ollama_roots())}"


def _ollama_list() -> list[StoreModel]:
    out, seen = [], set()
    for root in ollama_roots():
        for manifest, parts in _ollama_manifests(root):
            name = _ollama_name(*parts)
            if name not in seen:  # a later root's copy is shadowed, as in resolution
                seen.add(name)
                out.append(_ollama_entry(root, manifest, name))
    return out


# --------------------------------------------------------------------------- LM Studio


def _split_file(ref: str) -> tuple[list[str], str | None] | None:
    """(repo parts, file or None) of ORG/NAME or ORG/NAME/FILE.gguf (the file may be in a subfolder)."""
    parts = ref.split("/")
    if len(parts) >= 3 and parts[-1].endswith(".gguf") and all(p and p not in (".", "..") for p in parts[2:]):
        return (parts[:2], "/".join(parts[2:])) if _valid(parts[:2]) else None
    return None


def _lmstudio_find(ref: str):
    split = _split_file(ref) or ((ref.split("/"), None) if len(ref.split("/")) == 2 else None)
    if split is None or not _valid(split[0]):
        return None
    (publisher, repo), file = split
    for root in lmstudio_roots():  # the first root that has the folder wins
        folder = root / publisher / repo
        if folder.is_dir():
            found = _folder_models(folder, f"{publisher}/{repo}", "lmstudio", file=file)
            if found:
                return found, ""
    what = f"{publisher}/{repo}" + (f"/{file}" if file else "")
    return [], f"LM Studio: no {what} in {_places(lmstudio_roots())}"


def _lmstudio_list() -> list[StoreModel]:
    out, seen = [], set()
    for root in lmstudio_roots():
        for folder in sorted(root.glob("*/*")) if root.is_dir() else []:
            if folder.is_dir() and _valid([folder.parent.name, folder.name]):
                for m in _folder_models(folder, f"{folder.parent.name}/{folder.name}", "lmstudio"):
                    if m.name not in seen:
                        seen.add(m.name)
                        out.append(m)
    return out


# --------------------------------------------------------------------------- Hugging Face cache


def _hf_refs(repo_dir: Path) -> dict[str, str]:
    """ref name -> commit hash, from refs/ (`main`, `v1.0`, `refs/pr/1`)."""
    refs_dir, out = repo_dir / "refs", {}
    for f in sorted(refs_dir.rglob("*")) if refs_dir.is_dir() else []:
        if f.is_file():
            try:
                out[f.relative_to(refs_dir).as_posix()] = f.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                pass
    return out


def _hf_snapshots(repo_dir: Path) -> list[Path]:
    snaps = repo_dir / "snapshots"
    return sorted(d for d in snaps.iterdir() if d.is_dir()) if snaps.is_dir() else []


def _hf_default(repo_dir: Path) -> str | None:
    """The default revision's commit: refs/main, else the only snapshot (a cache filled by commit hash)."""
    main = _hf_refs(repo_dir).get("main")
    if main:
        return main
    snaps = _hf_snapshots(repo_dir)
    return snaps[0].name if len(snaps) == 1 else None


def _hf_snapshot(repo_dir: Path, revision: str | None) -> Path:
    snaps = _hf_snapshots(repo_dir)
    refs = _hf_refs(repo_dir)
    known = f"refs: {', '.join(refs) or 'none'}; snapshots: {', '.join(s.name[:12] for s in snaps) or 'none'}"
    if revision is None:
        commit = _hf_default(repo_dir)
        if commit is None:
            raise _Broken(f"no refs/main and {len(snaps)} snapshots: give @REVISION ({known})")
    elif revision in refs:
        commit = refs[revision]
    else:
        matches = [s.name for s in snaps if re.fullmatch(r"[0-9a-f]{7,40}", revision) and s.name.startswith(revision)]
        if len(matches) != 1:
            raise _Broken(f"{'ambiguous' if matches else 'no'} revision {revision!r} ({known})")
        commit = matches[0]
    if not (repo_dir / "snapshots" / commit).is_dir():
        raise _Broken(f"revision {revision or 'main'} is commit {commit[:12]}, which has no snapshot folder")
    return repo_dir / "snapshots" / commit


def _hf_find(ref: str):
    body, sep, revision = ref.rpartition("@")
    if not sep:
        body, revision = ref, None
    elif not _REVISION.fullmatch(revision) or ".." in revision:
        return None
    split = _split_file(body)
    if split is None:
        parts = body.split("/")
        if not 1 <= len(parts) <= 2:
            return None
        split = (parts, None)
    parts, file = split
    if not _valid(parts):
        return None
    repo_id = "/".join(parts)
    repo_dir = hf_hub_root() / ("models--" + "--".join(parts))
    if not repo_dir.is_dir():
        return [], f"Hugging Face cache: no {repo_dir.name} in {_places([hf_hub_root()])}"
    suffix = f"@{revision}" if revision else ""
    try:
        snapshot = _hf_snapshot(repo_dir, revision)
    except _Broken as e:
        return [StoreModel(repo_id + suffix, "huggingface", "hf", repo_dir, str(e))], ""
    found = _folder_models(snapshot, repo_id, "huggingface", suffix, file)
    if not found:
        return [], f"Hugging Face cache: no {file} in {snapshot}"
    return found, ""


def _hf_list() -> list[StoreModel]:
    hub, out = hf_hub_root(), []
    for repo_dir in sorted(hub.glob("models--*")) if hub.is_dir() else []:
        repo_id = repo_dir.name[len("models--"):].replace("--", "/")  # HF forbids '--' inside names
        if not repo_dir.is_dir() or not _valid(repo_id.split("/")):
            continue
        default = _hf_default(repo_dir)
        by_commit: dict[str, str] = {}
        for ref, commit in _hf_refs(repo_dir).items():
            by_commit.setdefault(commit, ref)
        snaps = _hf_snapshots(repo_dir)
        if not snaps:
            out.append(StoreModel(repo_id, "huggingface", "hf", repo_dir, "no snapshots (nothing downloaded)"))
        for snap in snaps:
            suffix = "" if snap.name == default else f"@{by_commit.get(snap.name, snap.name[:12])}"
            out += _folder_models(snap, repo_id, "huggingface", suffix)
    return out


_FINDERS = {"ollama": _ollama_find, "lmstudio": _lmstudio_find, "huggingface": _hf_find}
