"""Ultralytics offline and in a temporary config dir, set before any test module imports it (it reads these once):
no online checks, and its settings and DDP scratch files never touch the user's own config."""

import atexit
import os
import shutil
import tempfile

if "YOLO_CONFIG_DIR" not in os.environ:  # before Ultralytics is imported: it reads these once
    _config_dir = tempfile.mkdtemp(prefix="dilateformer-yolo-cfg-")
    atexit.register(shutil.rmtree, _config_dir, True)
    os.environ["YOLO_CONFIG_DIR"] = _config_dir
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_VERBOSE", "False")
