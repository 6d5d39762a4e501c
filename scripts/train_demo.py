"""Train the embedded demo model: a thin wrapper around `python -m engines.demo_world.train` (same arguments)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.demo_world.train import main  # noqa: E402

if __name__ == "__main__":
    main()
