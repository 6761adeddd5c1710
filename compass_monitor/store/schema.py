"""Names and constants of the run store's on-disk layout (schema version 2).

The layout is documented for people in ``docs/store-schema.md``; this module is
its single source of truth for code. Parameter names never become paths: each
monitored parameter gets an id ``p0000``, ``p0001``, ... and the names live in
the root group's attributes.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "FORMAT_NAME",
    "COMMIT_FILE",
    "COUNT_FIELDS",
    "REFERENCE_MASKS",
    "param_id",
    "PREVIEW_MAX_BLOCKS",
    "RUN_STATUSES",
    "StoreError",
    "StoreExistsError",
    "NotARunError",
    "SchemaVersionError",
    "ResumeError",
    "StoreDamagedError",
    "StoreLockedError",
    "LOCK_FILE",
]

FORMAT_NAME = "compass-monitor-run"
SCHEMA_VERSION = 2
#: Oldest layout this package still reads (version 1 stored every mask packed; it
#: reads as version 2 with every frame a packed key frame).
OLDEST_READABLE_VERSION = 1
#: JSON file replaced atomically after each snapshot; readers read only up to it.
COMMIT_FILE = "commit.json"
#: Held (``flock``) by the one process writing the store; holds that writer's pid and host.
LOCK_FILE = "writer.lock"
#: ``running`` (a writer is or was appending), ``finished``, ``disabled`` (the monitor stopped itself).
RUN_STATUSES = ("running", "finished", "disabled")
#: Previews: at most this many blocks along each axis of a matrix.
PREVIEW_MAX_BLOCKS = 32
#: Columns of ``masks/frames`` (T, P, 4) int64.
FRAME_FIELDS = ("encoding", "ones", "rice_k", "split")

#: Columns of ``metrics/counts`` (T, P, len(COUNT_FIELDS)), int64.
COUNT_FIELDS = (
    "changed",  # |M|, weights whose bf16 value differs from the base (NaN counts as changed)
    "changed_and_principal",  # |M ∩ M_princ|
    "changed_and_low",  # |M ∩ M_low|
    "changed_and_principal_not_low",  # |M ∩ M_princ ∩ M_low^c|
    "flips_since_previous",  # |M_t xor M_{t-1}| (M_{-1} = empty)
    "nonfinite",  # NaN or Inf values in the current weights
)
#: Rows of ``masks/reference/<id>`` (3, nbytes), and of ``metrics/null_overlap``'s last axis.
REFERENCE_MASKS = ("principal", "low", "principal_not_low")

# Array paths inside the group.
BASE_FINGERPRINT = "base/fingerprint"
BASE_CLASS_COUNTS = "base/class_counts"
REFERENCE_PREFIX = "masks/reference"
CHANGED_PREFIX = "masks/changed"
FRAMES = "masks/frames"
PREVIEW_PREFIX = "previews"
BASE_WEIGHTS_PREFIX = "base/weights"
ROWS_PREFIX = "profiles/rows"
COLS_PREFIX = "profiles/cols"
STEPS = "snapshots/step"
TIMES = "snapshots/time"
COUNTS = "metrics/counts"
NULL_OVERLAP = "metrics/null_overlap"


from ..matrix_spec import param_id  # noqa: E402  (re-exported: the store's ids)


class StoreError(RuntimeError):
    """The run store cannot be created, opened or written as asked."""


class StoreExistsError(StoreError):
    """The target path already holds a run or other data."""


class NotARunError(StoreError):
    """The path is not a compass-monitor run store."""


class SchemaVersionError(StoreError):
    """The store was written by a newer compass-monitor."""


class ResumeError(StoreError):
    """A run store cannot be continued with this model or configuration (the message says what differs)."""


class StoreDamagedError(StoreError):
    """Part of the store is missing, truncated, corrupt or inconsistent (the message names the file
    and, where there is one, the snapshot). Nothing damaged is ever returned as data."""


class StoreLockedError(StoreError):
    """Another writer holds the run store (the message names its pid and host)."""

#: Spectral diagnostics (T, P, len(SPECTRAL_FIELDS)) float64, NaN where not computed
#: (off, or not a spectral snapshot). Added in schema 2; older stores lack the array.
SPECTRAL = "metrics/spectral"
SPECTRAL_FIELDS = (
    "nss",  # ||sigma(W_t) - sigma(W_0)|| / ||sigma(W_0)|| (Sec. 4.1)
    "max_angle_left_deg",  # largest principal angle, top-k left singular subspaces
    "max_angle_right_deg",  # same, right subspaces
    "topk_energy_rel_change",  # Ky Fan k-norm change relative to W_0's (Cor. 3.5)
)
#: Unit of each ``SPECTRAL_FIELDS`` column ("1": dimensionless ratio); also the array's attribute ``units``.
SPECTRAL_UNITS = ("1", "degree", "degree", "1")

# The spectra behind Fig. 4 (Sec. 4.1), per spectral snapshot and matrix, K = the run's
# ``spectral_k``; NaN where not computed and past a matrix's own k = min(K, m, n).
# Created only when spectral diagnostics are on; older stores lack them.
#: All K principal angles (T, P, 2, K) float64 degrees, descending; axis 2 in ``SPECTRAL_SIDES`` order.
SPECTRAL_ANGLES = "metrics/spectral_angles"
#: Sides of ``SPECTRAL_ANGLES``: top-K left (U) and right (V) singular subspaces of W_0 vs W_t.
SPECTRAL_SIDES = ("left", "right")
#: Top-K singular values of W_t (T, P, K) float64, descending, units of the weights.
SPECTRAL_SV = "metrics/spectral_sv"
#: Top-K singular values of W_0 (T, P, K) float64, descending; the same on every spectral snapshot.
SPECTRAL_SV_BASE = "metrics/spectral_sv_base"
#: The three arrays above, in the order the writer and reader list them.
SPECTRAL_DETAIL = (SPECTRAL_ANGLES, SPECTRAL_SV, SPECTRAL_SV_BASE)
