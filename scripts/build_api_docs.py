"""Build legato's API reference from its docstrings with pdoc: one HTML page per public module
(names without a leading underscore), into the folder given (default docs/api/, not tracked).

    .venv/bin/python scripts/build_api_docs.py [OUT]      (make api-docs)

The MXNet adapter lives in .venv-mxnet (mxnet needs numpy<1.24), so it is documented there:
`.venv-mxnet/bin/python scripts/build_api_docs.py OUT --mxnet` writes its pages alone (make
api-docs puts them in docs/api/mxnet/).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def public_modules(mxnet: bool = False) -> list[str]:
    names = []
    for path in sorted((ROOT / "legato").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if any(part.startswith("_") and part != "__init__" for part in rel.parts):
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        if name.startswith("legato.adapters.mxnet") != mxnet:
            continue
        names.append(name)
    return names


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv and not argv[0].startswith("-") else ROOT / "docs" / "api"
    try:
        import pdoc
    except ImportError:
        print("build_api_docs: pdoc is not installed here (requirements/main.txt has it; make "
              "setup installs it)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(ROOT))
    mxnet = "--mxnet" in argv
    modules = public_modules(mxnet=mxnet)
    # packages are walked for their submodules too: keep the other environment's out
    modules += [] if mxnet else ["!legato.adapters.mxnet", "!legato.adapters.mxnet.*"]
    import warnings

    # a package's page walks its submodules, which this list also names (one page each)
    warnings.filterwarnings("ignore", message="The module specification")
    if not mxnet:  # legato.adapters lists its mxnet subpackage, which lives in .venv-mxnet
        warnings.filterwarnings("ignore", message="Couldn't import legato.adapters.mxnet")
        warnings.filterwarnings("ignore", message="Error loading legato.adapters.mxnet")
    # a module's import (tensorflow's) asks the platform's name; not an API concern
    warnings.filterwarnings("ignore", message="Suppressed execution of")
    pdoc.render.configure(docformat="google", footer_text="legato API reference")
    pdoc.pdoc(*modules, output_directory=out)
    pages = len(list(out.rglob("legato/**/*.html"))) + len(list(out.glob("legato.html")))
    print(f"build_api_docs: {pages} pages in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
