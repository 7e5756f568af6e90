"""``python -m dtrain.configref``, the documented command: the tool is ``dtrain/tools/configref.py``."""

from dtrain.tools.configref import main

if __name__ == "__main__":
    main()
