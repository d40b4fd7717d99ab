"""``python -m deploy.mcref_app -i IN -o OUT [--bundle PATH]``: run the application in-process."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
