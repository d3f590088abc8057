"""``python -m dar.bindings.comfyui.install /path/to/ComfyUI``: the one step after ``pip install
dar-attention`` (into ComfyUI's Python). It writes ``custom_nodes/dar_attention/__init__.py``, a
two-line node pack that hands ComfyUI this package's node mappings; nothing else is touched."""

from __future__ import annotations

import pathlib
import sys

PACK = "dar_attention"
SOURCE = ('"""DAR node pack: the nodes live in the installed dar-attention package (dar.bindings.comfyui)."""\n'
          "from dar.bindings.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401\n")


def install(comfy_root) -> pathlib.Path:
    root = pathlib.Path(comfy_root)
    nodes = root / "custom_nodes"
    if not nodes.is_dir():
        raise FileNotFoundError(f"{root} has no custom_nodes folder: pass the ComfyUI folder (the one holding main.py)")
    target = nodes / PACK / "__init__.py"
    target.parent.mkdir(exist_ok=True)
    target.write_text(SOURCE, encoding="utf-8")
    return target


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dar.bindings.comfyui.install /path/to/ComfyUI", file=sys.stderr)
        return 2
    print(f"wrote {install(argv[0])}; restart ComfyUI")
    return 0


if __name__ == "__main__":
    sys.exit(main())
