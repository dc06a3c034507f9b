"""Well-known locations: the repository, the models folder, run state, caches."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = MODELS_DIR / DEFAULT_MODEL_NAME
RUN_DIR = REPO_ROOT / ".run"
CACHE_DIR = REPO_ROOT / ".cache"
ASSETS_DIR = CACHE_DIR / "assets"
