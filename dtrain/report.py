"""``python -m dtrain.report``, the documented command: the tool is ``dtrain/tools/report.py``."""

from dtrain.tools.report import main

if __name__ == "__main__":
    main()
