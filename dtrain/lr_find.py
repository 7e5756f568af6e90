"""``python -m dtrain.lr_find``, the documented command: the tool is ``dtrain/tools/lr_find.py``."""

from dtrain.tools.lr_find import main

if __name__ == "__main__":
    main()
