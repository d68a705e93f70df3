"""Where the project's own files are: its root (the code a submitted job ships) and its configs."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
