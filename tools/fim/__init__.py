"""Fisher sidecar tools for kvqd: calibration from text, import of Adam's
exp_avg_sq and of per-tensor score maps (see sidecar.py for the format)."""

from .sidecar import (SOURCES, SidecarError, fingerprint, layout_of, read,
                      row_sums, traces, verify, write)

__all__ = ["SOURCES", "SidecarError", "fingerprint", "layout_of", "read",
           "row_sums", "traces", "verify", "write"]
