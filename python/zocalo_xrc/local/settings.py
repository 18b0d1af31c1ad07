"""The local Zocalo's own settings, kept where Zocalo keeps settings: in the
zocalo configuration's ``storage`` plugin, beside the dispatcher's
``zocalo.recipe_directory`` and logbook. Services started by
``zocalo.service`` read them from there as in-process ones do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PIA_KINDS = frozenset({"gpu", "cpu"})


@dataclass(frozen=True)
class Settings:
    #: which per-image analysis runs: GPU (at start) and/or CPU (at end)
    pia: frozenset[str] = PIA_KINDS
    #: frames per second the simulated detector writes and per-image analysis keeps up with
    frame_rate: float = 500.0
    #: seconds an X-ray centring group may sit idle before it is aborted (None: the service's default)
    idle_s: float | None = None
    #: seconds GPU per-image analysis waits for a detector's next frame before it names the missing (FFS: 30)
    frame_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.pia or not self.pia <= PIA_KINDS:
            raise ValueError(f"per-image analysis: expected gpu, cpu or both, got {','.join(sorted(self.pia))!r}")
        if not self.frame_rate > 0:
            raise ValueError(f"frame rate: expected frames per second > 0, got {self.frame_rate!r}")
        if self.idle_s is not None and not self.idle_s > 0:
            raise ValueError(f"idle time: expected seconds > 0, got {self.idle_s!r}")
        if not self.frame_timeout_s >= 0:
            raise ValueError(f"frame timeout: expected seconds >= 0, got {self.frame_timeout_s!r}")

    @classmethod
    def parse_pia(cls, text: str) -> frozenset[str]:
        kinds = frozenset(k.strip().lower() for k in text.replace("+", ",").split(",") if k.strip())
        if text.strip().lower() == "both":
            kinds = PIA_KINDS
        return kinds

    def storage(self) -> dict[str, Any]:
        """These settings as storage plugin keys."""
        d: dict[str, Any] = {"zocalo_xrc.pia": ",".join(sorted(self.pia)), "zocalo_xrc.frame_rate": self.frame_rate,
                          "zocalo_xrc.frame_timeout_s": self.frame_timeout_s}
        if self.idle_s is not None:
            d["zocalo_xrc.idle_s"] = self.idle_s
        return d

    @classmethod
    def of(cls, config: Any) -> Settings:
        """The settings a zocalo configuration holds (defaults for what it does not)."""
        storage = getattr(config, "storage", None) if config is not None else None
        if not storage:
            return cls()
        idle = storage.get("zocalo_xrc.idle_s")
        return cls(pia=cls.parse_pia(str(storage.get("zocalo_xrc.pia", "gpu,cpu"))),
                   frame_rate=float(storage.get("zocalo_xrc.frame_rate", cls.frame_rate)),
                   idle_s=float(idle) if idle is not None else None,
                   frame_timeout_s=float(storage.get("zocalo_xrc.frame_timeout_s", cls.frame_timeout_s)))
