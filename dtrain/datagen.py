"""``python -m dtrain.datagen``, the documented command: the tool is ``dtrain/tools/datagen.py``."""

from dtrain.tools.datagen import main

if __name__ == "__main__":
    main()
