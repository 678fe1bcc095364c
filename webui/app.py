"""Start the difflora web UI from a checkout: ``python webui/app.py --model MODEL --lora-dir DIR [--data-root DIR]
[--host] [--port] [--share]``, the same as ``difflora webui``. The page itself lives in :mod:`difflora.webui`."""

import sys
from pathlib import Path

# From a checkout without `pip install -e .`, find the difflora package beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from difflora.webui import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
