"""`p2pllm models [--json]`: the models found in Ollama, LM Studio and the Hugging Face cache.

Each entry is read only as far as its header (GGUF) or config.json (Hugging Face), so listing a
store of large models is fast; a broken entry is listed with its error instead of stopping the list.
"""

from __future__ import annotations

import json
import sys

from ..errors import ModelFileError
from .store import StoreModel, list_models, searched_places


def describe(m: StoreModel) -> dict:
    """name, source, format, arch, quantization, size (bytes of the weights), path, error (None if fine)."""
    out = {"name": m.name, "source": m.source, "format": m.format, "arch": None, "quantization": None,
           "size": None, "path": str(m.path), "error": m.error or None}
    if m.error:
        return out
    try:
        if m.format == "gguf":
            out.update(_gguf_facts(m))
        else:
            out.update(_hf_facts(m))
    except ModelFileError as e:  # the problem alone when it is about the listed path itself
        out["error"] = e.problem if e.path == str(m.path) else str(e)
    except OSError as e:
        out["error"] = f"cannot read ({e.strerror or type(e).__name__})"
    return out


def _gguf_facts(m: StoreModel) -> dict:
    import gguf

    from .formats import open_model_file

    mf = open_model_file(m.path)
    try:
        # general.file_type names the mix (Q4_K_M) as llama.cpp, Ollama and LM Studio show it; files
        # without it: the tensor type holding most of the bytes
        quant = None
        try:
            quant = gguf.LlamaFileType(int(mf.metadata["general.file_type"])).name.split("_", 1)[1]
        except (KeyError, ValueError, TypeError):
            by_type: dict[str, int] = {}
            for t in mf.tensors.values():
                by_type[t.dtype] = by_type.get(t.dtype, 0) + t.nbytes
            quant = max(by_type, key=by_type.get) if by_type else None
        return {"arch": mf.metadata.get("general.architecture"), "quantization": quant, "size": m.path.stat().st_size}
    finally:
        mf.close()


def _hf_facts(m: StoreModel) -> dict:
    from .formats import _read_json

    cfg = _read_json(m.path / "config.json")
    quant = cfg.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None  # gptq, awq, ...: not a dtype
    dtype = method or cfg.get("torch_dtype") or cfg.get("dtype")
    size = sum(f.stat().st_size for f in m.path.glob("*.safetensors") if f.is_file())
    return {"arch": cfg.get("model_type"), "quantization": dtype, "size": size}


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def format_table(rows: list[dict]) -> str:
    header = ("NAME", "SOURCE", "FORMAT", "ARCH", "QUANT", "SIZE", "PATH")
    cells = [(r["name"], r["source"], r["format"], r["arch"] or "-", str(r["quantization"] or "-"),
              human_size(r["size"]), r["path"]) for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header) - 1)]
    lines = []
    for i, c in enumerate([header, *cells]):
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1])
        if i and rows[i - 1]["error"]:
            lines.append(f"    error: {rows[i - 1]['error']}")
    return "\n".join(lines)


def cmd_models(args) -> int:
    rows = [describe(m) for m in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows))
    if not rows:
        print(f"no models found; looked in {searched_places()}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="list the models in Ollama, LM Studio and the Hugging Face cache",
                       description="List the models already on this machine (Ollama, LM Studio, Hugging Face "
                                   "cache); the NAME column is what --model accepts.")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_models)
