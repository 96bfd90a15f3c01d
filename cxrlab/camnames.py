"""File names of Grad-CAM overlays: `epoch{EEE}_true-{TRUE}_pred-{PRED}_{stem}.png`.

Written by training (`cam/`) and `cxrlab explain`, read by `cxrlab.report` to split a gallery
into correct and wrong cases. Underscores, `%` and path separators inside class names are
percent-encoded so that a name always parses back to the same fields; ordinary class names
(letters, digits, `-`) appear unchanged. The `epoch` prefix is optional (None: no epoch).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

_PATTERN = re.compile(r"^(?:epoch(?P<epoch>\d+)_)?true-(?P<true>[^_]+)_pred-(?P<pred>[^_]+)_(?P<stem>.+)\.png$")


def _encode(label: str) -> str:
    return quote(str(label), safe=" -.+=,()[]@!~'#&").replace("_", "%5F")


def cam_name(epoch: int | None, true: str, pred: str, stem: str) -> str:
    """The overlay file name for one image.

    Args:
        epoch: training epoch (1-based), or None for overlays made outside training.
        true: true class name.
        pred: predicted class name.
        stem: the image's file stem (no directories, no extension).

    Returns:
        e.g. `epoch003_true-NORMAL_pred-PNEUMONIA_img001.png`.
    """
    if not stem or "/" in stem or "\\" in stem:
        raise ValueError(f"stem must be a non-empty file stem without directories, got {stem!r}")
    prefix = "" if epoch is None else f"epoch{int(epoch):03d}_"
    return f"{prefix}true-{_encode(true)}_pred-{_encode(pred)}_{stem}.png"


def parse_cam_name(name: str) -> dict:
    """The fields of an overlay file name made by `cam_name` (directories are ignored).

    Args:
        name: file name or path.

    Returns:
        dict(epoch=int | None, true=str, pred=str, stem=str).

    Raises:
        ValueError: the name does not follow the pattern.
    """
    base = re.split(r"[\\/]", str(name))[-1]
    m = _PATTERN.match(base)
    if not m:
        raise ValueError(f"{base!r} is not a CAM file name like 'epoch003_true-A_pred-B_stem.png'")
    epoch = m.group("epoch")
    return {
        "epoch": None if epoch is None else int(epoch),
        "true": unquote(m.group("true")),
        "pred": unquote(m.group("pred")),
        "stem": m.group("stem"),
    }
