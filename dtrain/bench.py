"""``python -m dtrain.bench``, the documented command: the tool is ``dtrain/tools/bench.py``."""

import sys

from dtrain.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
