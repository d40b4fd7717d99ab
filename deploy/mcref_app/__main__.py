"""``python -m deploy.mcref_app -i IN -o OUT [--bundle PATH]``: run the application in-process.

Also runs as ``python PATH/TO/mcref_app`` (how a MONAI Application Package starts its app
folder): the folder is then imported as a package from its parent folder.
"""

import sys

if __package__:
    from .app import main
else:  # run as a folder: make its parent importable and import the folder as a package
    import importlib
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    main = importlib.import_module(f"{_here.name}.app").main

if __name__ == "__main__":
    sys.exit(main())
