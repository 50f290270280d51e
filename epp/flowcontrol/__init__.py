"""Flow control for the picker: saturation, fair queueing (VTC) and admission.

The gatekeeper builds one `AdmissionController` with a saturation check, awaits
`admit(FlowItem)` per request, reports output tokens with `charge_output`, and calls
`notify()` when a request finishes or metrics refresh.
"""

from infergw.epp.flowcontrol.admission import (
    CANCELLED,
    HTTP_STATUS,
    QUEUED,
    Admission,
    FlowControlStats,
    Outcome,
)
from infergw.epp.flowcontrol.admission_queue import AdmissionController
from infergw.epp.flowcontrol.config import (
    BandConfig,
    FairnessConfig,
    FlowControlConfig,
    FlowControlConfigError,
    SaturationConfig,
)
from infergw.epp.flowcontrol.queue import Band, FlowItem
from infergw.epp.flowcontrol.saturation import SaturationDetector
from infergw.epp.flowcontrol.vtc import VirtualTokenCounter

__all__ = [
    "CANCELLED",
    "HTTP_STATUS",
    "QUEUED",
    "Admission",
    "AdmissionController",
    "Band",
    "BandConfig",
    "FairnessConfig",
    "FlowControlConfig",
    "FlowControlConfigError",
    "FlowControlStats",
    "FlowItem",
    "Outcome",
    "SaturationConfig",
    "SaturationDetector",
    "VirtualTokenCounter",
]
