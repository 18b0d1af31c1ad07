"""``zocalo-xrc``: X-ray centring from the command line.

    zocalo-xrc centre scan.json [--json] [--plot out.png]
    zocalo-xrc demo scan3d.json [--broker in-process|URL|ENVIRONMENT] [--timeout S]

A 2D case is ``{"counts": [...], "gridinfo": {...}}``; a 3D case is
``{"grids": [{"dcid": ..., "counts": [...], "gridinfo": {...}}, {...}]}``.
Either may add ``sample_id``, ``loop_type`` and ``multipin_sample_ids``; a 3D
case may add ``threshold`` and ``threshold_absolute``.

Every error is one line on stderr and an exit code that says its kind
(:data:`EXIT_CODES`); there is no traceback unless ``--log-level DEBUG``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from . import __version__
from ._text import quoted, read_json
from ._native import XrcResults
from ._results import GridScan2DResult, XrcResult
from .centring import GridScan, centre_2d, centre_3d_scans, well_limits
from .messaging.config import ConfigurationError, default_environment, looks_like_url, redact, zocalo_environment_blocks
from .geometry import GridGeometry
from .grid import GridInfo, reshape_grid
from .summary import format_2d, format_3d
from .service.runner import IDLE_S, XrcService
from .service.metrics import ServiceMetrics
from .service.metrics import serve as serve_metrics
from .service.shards import ShardedService
from .client import IN_PROCESS
from .messaging import ConnectionSettings, TransportError

log = logging.getLogger("zocalo_xrc.cli")

EXIT_OK = 0
EXIT_FILE = 1  # a file cannot be read or written, or does not hold a case
EXIT_USAGE = 2  # the command line itself (argparse's own code)
EXIT_BROKER = 3  # the configuration, or the broker: cannot connect, refused, unroutable
EXIT_ZOCALO = 4  # Zocalo failed, or did not answer in time
EXIT_INTERNAL = 70  # a bug in zocalo-xrc (the traceback with --log-level DEBUG)
EXIT_INTERRUPTED = 130  # Ctrl-C
_ALL = ("centre", "demo", "find-spots", "service", "local up", "local add-scan", "local logbook")
#: What each exit code means, and which commands can end with it.
_MEANINGS = [
    (EXIT_OK, "done", ("centre", "demo", "find-spots", "local add-scan", "local logbook")),
    (EXIT_OK, "stopped by SIGTERM (it runs until stopped)", ("service", "local up")),
    (EXIT_FILE, "a file cannot be read or written, or does not hold a valid case",
     ("centre", "demo", "find-spots", "local up", "local add-scan", "local logbook")),
    (EXIT_USAGE, "the command line is wrong", _ALL),
    (EXIT_BROKER, "the broker or database configuration is wrong, or they cannot be reached",
     ("demo", "service", "local up", "local add-scan")),
    (EXIT_ZOCALO, "Zocalo failed, or sent no results in time", ("demo",)),
    (EXIT_INTERNAL, "an error in zocalo-xrc itself (--log-level DEBUG shows where)", _ALL),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)", _ALL),
]


def exit_codes(command: str | None = None) -> str:
    """The epilog of a help text: the exit codes ``command`` (``local`` for
    any of its subcommands; None for any command) can end with, each once."""
    rows: dict[int, list[str]] = {}
    for code, meaning, commands in _MEANINGS:
        if command is None or any(c == command or c.startswith(f"{command} ") for c in commands):
            rows.setdefault(code, []).append(meaning)
    return "exit codes:\n" + "\n".join(f"  {code:<4} {'; or '.join(m)}" for code, m in rows.items())


EXIT_CODES = exit_codes()

#: Why a command cannot run on a broker inside its own process.
_NEEDS_A_SHARED_BROKER = {
    "service": "the service takes its messages from other processes (per-image analysis), which cannot reach a "
               "broker inside this one",
    "local up": "local up runs each service as a process of its own, and they meet on RabbitMQ",
}


def broker_help(command: str) -> str:
    """What ``--broker`` takes for ``command``: the same forms for every command."""
    forms = "an amqp://user:password@host:port/vhost URL, or a zocalo environment of the YAML file $ZOCALO_CONFIG " \
            "(keeps the password off the command line)"
    if command == "demo":
        return f"the broker: 'in-process' (a broker inside this process; the default), {forms}"
    default = " (required)" if command == "local up" else \
        " (default: dodal's environment, bluesky, or dev_bluesky with DODAL_TEST_MODE=true)"
    return f"RabbitMQ: {forms}{default}"


def broker_of(text: str | None, command: str, flag: str = "--broker") -> ConnectionSettings | None:
    """What ``--broker`` names, read the same way by every command: an
    amqp:// URL, a zocalo environment of ``$ZOCALO_CONFIG``, or
    ``'in-process'`` (None: a broker inside this process, for the demo
    only). ``text`` None is the command's default: the in-process broker for
    the demo, dodal's environment otherwise. Errors suggest only what
    ``command`` can use, and name ``flag``, the option the user gave."""
    in_process = command not in _NEEDS_A_SHARED_BROKER
    if text == IN_PROCESS or (text is None and in_process):
        if in_process:
            return None
        raise CliError(f"{flag}: {_NEEDS_A_SHARED_BROKER[command]}: give an amqp:// URL or a zocalo environment "
                       "('zocalo-xrc demo' runs in one process)", EXIT_USAGE)
    if text == "":
        raise CliError(f"{flag}: an empty string names no broker", EXIT_USAGE)
    if text is not None and looks_like_url(text):
        try:
            return ConnectionSettings.from_url(text)
        except ConfigurationError as e:
            raise CliError(f"{flag}: {e}", EXIT_USAGE) from None
    environment = text or default_environment()
    if not os.environ.get("ZOCALO_CONFIG"):
        other = "an amqp:// URL" + (", or 'in-process' for a broker inside this process" if in_process else "")
        raise CliError(f"{flag}: no zocalo configuration for environment {environment!r}: set ZOCALO_CONFIG to "
                       f"a zocalo YAML file, or give {other}", EXIT_BROKER)
    try:
        return ConnectionSettings.from_zocalo_config(environment)
    except ConfigurationError as e:
        raise CliError(str(e), EXIT_BROKER) from None


#: How long ``service`` and ``local up`` keep trying to reach their broker as they start (--connect-timeout).
CONNECT_TIMEOUT_S = 30.0
CONNECT_HELP = (
    "how long to keep trying to reach the broker as it starts: one warning when an attempt fails, one error line "
    "when it gives up (exit code 3); a refused user name or password gives up at once")


def wait_for_broker(transport: Any, timeout: float) -> None:
    """The connection policy of ``service`` and ``local up``: keep trying
    for ``timeout`` seconds, saying so once (each attempt is logged at
    DEBUG), and give up at once if the broker refuses the credentials;
    :class:`TransportError` (one line) when it gives up."""
    attempts = logging.getLogger("zocalo_xrc.messaging.rabbitmq")
    level = attempts.level
    if not attempts.isEnabledFor(logging.DEBUG):
        attempts.setLevel(logging.ERROR)  # each attempt's WARNING: this says it once
    deadline, seen, said = time.monotonic() + timeout, None, False
    try:
        while not transport.connected.wait(0.05):
            error = transport.last_error
            if transport.credentials_refused:
                raise TransportError(f"cannot connect to {transport.settings.url()}: {error}")
            if time.monotonic() >= deadline:
                raise TransportError(f"cannot connect to {transport.settings.url()}: {error or 'no answer'} "
                                     f"(gave up after {timeout:g} s, --connect-timeout)")
            if error is not None and seen is not None and not said:  # seen twice: not a refused password
                log.warning("cannot connect to %s (%s); trying again for up to %g s (--connect-timeout)",
                            transport.settings.url(), error, timeout)
                said = True
            seen = error
    finally:
        attempts.setLevel(level)


class CliError(Exception):
    """An error for the command line: one line and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class CaseError(ValueError):
    """The input file does not describe a 2D or 3D case."""


def load_case(path: Path) -> dict[str, Any]:
    """A case file's content, checked as every scan file is (:class:`~zocalo_xrc.local.scan.Scan`)."""
    case: dict[str, Any] = read_json(path, CaseError)
    try:
        scan_of(case)
    except ValueError as e:
        raise CaseError(f"{path}: {e}") from None
    return case


def scan_of(case: Any) -> Any:
    """The scan a case describes, read by the one reader of scan files (the
    demo's and ``local add-scan``'s), so every command names a bad file's
    fault in the same words, where the file holds it."""
    from .local.scan import Scan

    return Scan.from_dict(case)


def _pin(case: dict[str, Any], grid: GridInfo) -> dict[str, Any]:
    loop_type = case.get("loop_type")
    return {
        "sample_id": case.get("sample_id"),
        "multipin_sample_ids": case.get("multipin_sample_ids"),
        "well_limits": well_limits(loop_type, grid.dx_mm) if loop_type else None,
    }


def scans_of(case: dict[str, Any], scan: Any) -> list[GridScan]:
    """The two grids of a 3D case, lower DCID (xy) first; a file that gives
    no DCIDs numbers its grids 1 and 2 in its order (xy, then xz)."""
    scans = []
    for k, g in enumerate(case["grids"]):
        dcid = g.get("dcid", k + 1)
        if isinstance(dcid, bool) or not isinstance(dcid, int):
            raise CaseError(f"grids[{k}].dcid: expected an integer, got {quoted(dcid)}")
        scans.append(GridScan(dcid, scan.counts(k), scan.grids[k]))
    return sorted(scans, key=lambda s: s.dcid)


def geometry_of(grids: Sequence[GridInfo]) -> GridGeometry:
    """The grid in mm relative to the centre of its first box (a case file
    holds no motor start positions): x and y from the xy grid, z from the xz
    grid's second axis when there is one."""
    xy = grids[0]
    if len(grids) == 1:
        return GridGeometry(0.0, xy.dx_mm, xy.steps_x, 0.0, xy.dy_mm, xy.steps_y)
    xz = grids[1]
    return GridGeometry(0.0, xy.dx_mm, xy.steps_x, 0.0, xy.dy_mm, xy.steps_y, 0.0, xz.dy_mm, xz.steps_y)


def run_case(case: dict[str, Any]) -> tuple[GridScan2DResult | XrcResults, list[tuple[str, Any]], GridGeometry]:
    """Centre a case; return the result, the grids ``(label, A[x][y])`` for
    display and the grid's geometry in mm."""
    scan = scan_of(case)
    if len(scan.grids) == 2:
        scans = scans_of(case, scan)
        options = {k: case[k] for k in ("threshold", "threshold_absolute") if k in case}
        first, second = scans
        results = centre_3d_scans(first, second, **options, **_pin(case, scans[0].grid))
        shown = [(f"xy (DCID {s.dcid})" if i == 0 else f"xz (DCID {s.dcid})", reshape_grid(s.counts, s.grid))
                 for i, s in enumerate(scans)]
        return results, shown, geometry_of([s.grid for s in scans])
    grid, counts = scan.grids[0], scan.counts(0)
    result = centre_2d(counts, grid, **_pin(case, grid))
    return result, [("xy", reshape_grid(counts, grid))], geometry_of([grid])


def result_payload(result: GridScan2DResult | XrcResults) -> str:
    """The payload Zocalo's centring step sends (``results``, ``status``,
    ``type``), as JSON; :func:`zocalo_xrc.parse_result_message` reads it back."""
    if isinstance(result, XrcResults):
        return json.dumps({"results": result.to_dicts(), "status": "success", "type": "3d"})
    return json.dumps({"results": [result.to_dict()], "status": "success", "type": "2d"})


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'zocalo-xrc[plot]'", EXIT_USAGE) from None
    return plt


def check_plot_path(out: Path) -> None:
    """Refuse an output path matplotlib cannot write before any work is done."""
    plt = _pyplot()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise CliError(f"--plot {out}: unknown image format {out.suffix or '(none)'!r}; use one of "
                       f"{', '.join('.' + f for f in sorted(formats))}", EXIT_USAGE)
    if not out.parent.is_dir():
        raise CliError(f"--plot {out}: no such directory {out.parent}", EXIT_FILE)


def plot(result: GridScan2DResult | XrcResults, grids: list[tuple[str, Any]], out: Path,
         geometry: GridGeometry | None = None,
         crystals: Sequence[tuple[Sequence[float], Sequence[float]]] = ()) -> None:
    """Heat maps of the grid(s) with each result's centre of mass and bounding
    box, ranked, and the best centre written on the figure: in mm (relative
    to the centre of the first box) when ``geometry`` is known, else in boxes.
    ``crystals``: where a model put crystals, ``(centre, size)`` in the same
    frame, drawn as dashed outlines.

    The xz grid is drawn under the xy grid, both to one scale and sharing x,
    so that what lies above what lines up; both share one colour scale (one
    colour bar, as tall as the grids). Every mark is an outline: nothing
    hides what it marks."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Ellipse, Patch, Rectangle

    results: list[XrcResult | GridScan2DResult] = (
        list(result) if isinstance(result, XrcResults) else ([result] if result.ok else []))
    unit = "mm" if geometry is not None else "boxes"
    if geometry is None:  # one box per unit, box k centred on k
        shape = [grids[0][1].shape[0], grids[0][1].shape[1]] + ([grids[1][1].shape[1]] if len(grids) > 1 else [])
        geometry = GridGeometry(*(v for n in shape for v in (0.0, 1.0, n)))  # type: ignore[arg-type]
    axes_of = geometry._axes()
    positions = [geometry.to_motor(r) for r in results]
    colours = ("red", "orange", "magenta", "white", "cyan")  # visible on viridis
    (xname, x0, dx, nx) = axes_of[0]
    spans = [abs(axes_of[1 + k][2]) * axes_of[1 + k][3] for k in range(len(grids))]  # each grid's height
    inches_per_unit = 6.0 / (abs(dx) * nx)  # the grids 6 inches wide, and as tall as that scale makes them
    height = sum(spans) * inches_per_unit + 0.55 * len(grids) + 1.6  # + titles and axis labels, legend, caption
    fig, axes = plt.subplots(len(grids), 1, sharex=True, squeeze=False, layout="constrained",
                             figsize=(8.5, height), height_ratios=spans)
    vmax = max(float(counts.max()) for _, counts in grids) or 1.0  # one colour scale for every grid
    where = " from the first box" if unit == "mm" else ""
    image = None
    for k, (ax, (label, counts)) in enumerate(zip(axes[:, 0], grids)):
        j = 1 + k  # y for the xy grid, z for the xz grid
        (vname, v0, dv, nv) = axes_of[j]
        extent = (x0 - 0.5 * dx, x0 + (nx - 0.5) * dx, v0 + (nv - 0.5) * dv, v0 - 0.5 * dv)
        image = ax.imshow(counts.T, origin="upper", cmap="viridis", interpolation="nearest", extent=extent,
                          aspect="equal", vmin=0.0, vmax=vmax)
        ax.set_title(label, loc="left", fontsize=10)
        ax.set_ylabel(f"{vname} ({unit}{where})")
        for rank, p in enumerate(positions, 1):
            colour = colours[(rank - 1) % len(colours)]
            (lo, hi), c = p.bounding_box_mm, p.centre_mm
            ax.add_patch(Rectangle((lo[0], lo[j]), hi[0] - lo[0], hi[j] - lo[j], fill=False, edgecolor=colour, lw=1.2))
            ax.plot(c[0], c[j], "o", mfc="none", mec=colour, ms=5, mew=1.2)
            ax.annotate(f"#{rank}", (hi[0], lo[j]), xytext=(2, 1), textcoords="offset points", color=colour,
                        fontsize=8, fontweight="bold", ha="left", va="bottom")
        for centre, size in crystals:
            ax.add_patch(Ellipse((centre[0], centre[j]), size[0], size[j], fill=False, edgecolor="cyan", ls="--",
                                 lw=0.8))
    axes[-1, 0].set_xlabel(f"{xname} ({unit}{where})")
    scale = "spots per image" + (" (one scale for both grids)" if len(grids) > 1 else "")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=scale, fraction=0.04, pad=0.02, aspect=30)
    region = "voxels" if isinstance(result, XrcResults) else "boxes"
    handles: list[Any] = [Line2D([], [], color=colours[(rank - 1) % len(colours)], lw=1.2,
                                 label=f"#{rank}: max count {r.max_count:g}, {r.n_voxels} {region}")
                          for rank, r in enumerate(results, 1)]
    if crystals:
        handles.append(Line2D([], [], color="cyan", ls="--", lw=0.8, label="crystal in the model"))
    if results:
        handles += [Line2D([], [], color="black", marker="o", mfc="none", ls="", label="centre of mass"),
                    Patch(fill=False, edgecolor="black", label="bounding box")]
    else:
        handles.append(Patch(color="none", label="no crystal found"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(_best_caption(results, positions, unit, [a[0] for a in axes_of], region), fontsize=9)
    _fit_height(fig, axes[:, 0])
    try:
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)


def _fit_height(fig: Any, axes: Any) -> None:
    """Take from the figure's height what the grids' fixed aspect leaves
    empty above and below them, so that the colour bar and the legend sit
    as close to the grids as they are tall."""
    for _ in range(3):
        fig.canvas.draw()
        unused = sum(ax.get_position(original=True).height - ax.get_position().height for ax in axes)
        width, height = fig.get_size_inches()
        if unused * height < 0.05:
            return
        fig.set_size_inches(width, height * (1 - unused))


def _best_caption(results: list[Any], positions: list[Any], unit: str, names: list[str], region: str) -> str:
    if not results:
        return "no crystal found"
    r, centre = results[0], positions[0].centre_mm
    where = ", ".join(f"{n} = {v:.4f}" if unit == "mm" else f"{n} = {v:.2f}" for n, v in zip(names, centre))
    return (f"best (#1): centre {where} {unit}; max count {r.max_count:g}, {r.n_voxels} {region}, "
            f"total count {r.total_count:g}")


def _command(commands: Any, name: str, summary: str, description: str, *, full_name: str | None = None) -> argparse.ArgumentParser:
    """A command's parser: its one-line help, its description wrapped, the
    exit codes it can end with (``full_name``: a subcommand's, ``local up``)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=textwrap.fill(description, 79), epilog=exit_codes(full_name or name),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zocalo-xrc", description="X-ray centring for MX grid scans",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"zocalo-xrc {__version__}")
    _logging_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    centre = _command(commands, "centre", "centre a 2D or 3D grid scan from a JSON file",
                      "Centre a 2D or 3D grid scan from a JSON case file and print the result.")
    centre.add_argument("file", type=Path, help="JSON: a 2D case (counts, gridinfo) or a 3D case (grids)")
    centre.add_argument("--json", action="store_true",
                        help="print the results payload as Zocalo's centring step sends it "
                             "({\"results\": [...], \"status\": \"success\", \"type\": \"2d\"|\"3d\"}) instead of a table")
    centre.add_argument("--plot", type=Path, metavar="OUT.png",
                        help="also draw the grids with the results marked, in mm from the first box "
                             "(any format matplotlib writes: .png, .pdf, .svg, ...; needs the [plot] extra)")
    _logging_options(centre, top=False)
    demo = _command(
        commands, "demo", "run one grid scan through a local Zocalo, from trigger to result",
        "Start a local Zocalo (zocalo's dispatcher, Mimas, per-image analysis, the X-ray centring "
        "service, ISPyB), register a grid scan in ISPyB, trigger it as dodal does (by default a simulated "
        "detector writes its frames and per-image analysis finds their spots), and wait for its results: "
        "prints the best crystal in boxes and mm and the time from the last frame to the result, and draws the "
        "grids. In this process by default (in-process broker, SQLite); --broker and --ispyb run it on RabbitMQ "
        "and MariaDB.")
    demo.add_argument("file", type=Path, nargs="?", default=None,
                      help="a scan file: recorded counts (examples/scan3d.json) or a crystal model "
                           "(default: two modelled crystals on a 20 x 10 + 20 x 10 grid, from pixels: see "
                           "--detector)")
    _local_options(demo, "demo")
    demo.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                      help="how long to wait for Zocalo's results (default: %(default)s)")
    demo.add_argument("--detector", default=None, metavar="eiger2x-4m",
                      help="run from pixels: a simulated detector (eiger2x-1m, -4m, -9m or -16m) writes the scan's "
                           "frames at --frame-rate and per-image analysis finds the spots in them; 'none': the scan "
                           "file's counts are played (default: eiger2x-1m for the default scan, about 90 MB of "
                           "frames; none for a scan file); the frames go to the state directory, removed at exit "
                           "unless --state is given")
    demo.add_argument("--plot", type=Path, default=Path("demo.png"), metavar="OUT.png",
                      help="where to draw the grids with the crystals found, in mm (default: %(default)s; "
                           "needs the [plot] extra; 'none' for no picture)")
    _logging_options(demo, top=False)
    spots = _command(
        commands, "find-spots", "find the spots on detector images, as Diamond's per-image analysis counts them",
        "Find the spots on every image of an Eiger/Odin master file (or a data file, or a .npy array) with "
        "DIALS's dispersion rule and print, per image, what Diamond's CPU per-image analysis reports: "
        "n_spots_total (spots with d <= --d-max), n_spots_no_ice (off the hexagonal-ice rings), n_spots_4A "
        "(d > 4 A) and total_intensity (of the spots off the ice rings), and the strong pixels. The file's pixel "
        "mask, trusted maximum and geometry are used; frames are searched in parallel. Images are numbered "
        "from 1, as Diamond's file-number.")
    spots.add_argument("file", type=Path, help="an Eiger/Odin *_master.h5, a data file, or a .npy (2D or 3D) array")
    spots.add_argument("--images", type=_image_range, default=None, metavar="FIRST:LAST",
                       help="which images, from 1, both included (default: all); one number for one image")
    spots.add_argument("--json", action="store_true",
                       help="one JSON object per image, keys as Diamond's per-image analysis sends them")
    spots.add_argument("--threads", type=_count, default=0, metavar="N", help="frames at a time (default: 0, every core)")
    spots.add_argument("--d-max", type=_resolution, default=40.0, metavar="ANGSTROM",
                       help="spots with centroids at lower resolution than this are left out (default: %(default)s; "
                            "'none' for no limit)")
    spots.add_argument("--d-min", type=_resolution, default=None, metavar="ANGSTROM",
                       help="spots at higher resolution than this are left out (default: no limit)")
    spots.add_argument("--algorithm", choices=["dispersion", "dispersion_extended"], default="dispersion",
                       help="DIALS's threshold rule (default: %(default)s, as Diamond's per-image analysis)")
    spots.add_argument("--min-spot-size", type=_count, default=3, metavar="PIXELS", help="(default: %(default)s)")
    spots.add_argument("--max-spot-size", type=_count, default=1000, metavar="PIXELS",
                       help="(default: %(default)s; 0 for no maximum)")
    spots.add_argument("--max-separation", type=_pixels, default=2.0, metavar="PIXELS",
                       help="keep spots whose brightest pixel is at most this far from their centroid, as DIALS's "
                            "spot finding (and so Diamond's per-image analysis) does (default: %(default)s; 'none' "
                            "for no such filter, as fast-feedback-service)")
    spots.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                       help="draw one image (--image) with its spots circled (needs the [plot] extra)")
    spots.add_argument("--image", type=_count, default=None, metavar="N",
                       help="the image --plot draws (default: the first of --images)")
    spots.add_argument("--scale", choices=["log", "linear"], default="log",
                       help="the plot's colour scale, clipped at the 99.5th percentile (default: %(default)s)")
    _logging_options(spots, top=False)
    local = _command(commands, "local", "run a local Zocalo for other clients, register scans, read its logbook",
                     "A local Zocalo on one machine: 'up' runs its services as separate zocalo.service processes "
                     "on RabbitMQ, 'add-scan' registers a simulated grid scan in its ISPyB, 'logbook' shows every "
                     "message of a recipe run.")
    actions = local.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = _command(actions, "up", "run the local Zocalo's services on RabbitMQ until stopped",
                  "Run zocalo's dispatcher, Mimas, simulated per-image analysis and the X-ray centring service as "
                  "zocalo.service processes on RabbitMQ, restarting any that dies, until SIGTERM or Ctrl-C. Clients "
                  "(dodal, Hyperion's tests, ZocaloTrigger) trigger scans registered with 'add-scan'.",
                  full_name="local up")
    _local_options(up, "local up")
    up.add_argument("--connect-timeout", type=_seconds, default=CONNECT_TIMEOUT_S, metavar="SECONDS",
                    help=CONNECT_HELP + "; once up, each service reconnects as workflows does, and one that dies "
                                        "is started again (default: %(default)s)")
    _logging_options(up, top=False)
    add = _command(actions, "add-scan", "register a simulated grid scan in ISPyB",
                   "Register a grid scan (data collection group, data collections, GridInfo) in the local Zocalo's "
                   "ISPyB, with its data for simulated per-image analysis; prints the DCIDs and the start messages "
                   "to send.", full_name="local add-scan")
    add.add_argument("file", type=Path, help="a scan file: recorded counts or a crystal model")
    add.add_argument("--name", default=None,
                     help="the detector file name the beamline sends (default: the scan file's name without its "
                          "suffix: scan3d for scan3d.json)")
    add.add_argument("--json", action="store_true", help="print what was registered as JSON")
    add.add_argument("--detector", default=None, metavar="eiger2x-4m",
                     help="write the scan's frames as a simulated detector does (eiger2x-1m, -4m, -9m or -16m): "
                          "the master file first, then the frames at --frame-rate, once the registration is printed; "
                          "per-image analysis then finds the spots in them (default: no frames, the scan file's "
                          "counts are played)")
    add.add_argument("--frame-rate", type=float, default=500.0, metavar="HZ",
                     help="with --detector: frames per second it writes (default: %(default)s)")
    _state_options(add, "local add-scan")
    _logging_options(add, top=False)
    book = _command(actions, "logbook", "every message of a recipe run (no GUID: list the runs)",
                    "Show every message of a recipe run and the runs it started, from the dispatcher's logbook and "
                    "the services' journals; without a GUID, list the runs the logbook knows.",
                    full_name="local logbook")
    book.add_argument("guid", nargs="?", default=None, help="a recipe run's GUID")
    book.add_argument("--dcid", type=_count, default=None, help="only runs of this DCID (when listing)")
    book.add_argument("--every-image", action="store_true", help="list per-image messages one by one")
    book.add_argument("--state", type=Path, default=None, metavar="DIR",
                      help="the local Zocalo's state directory (default: $XDG_STATE_HOME/zocalo-xrc)")
    _logging_options(book, top=False)
    service = _command(
        commands, "service", "run the X-ray centring service: per-image spot counts in, results out",
        "Consume per-image analysis messages (recipe envelopes) from a queue, centre each grid scan once all its "
        "images are in, and send the result to the recipe step's success output. Runs until stopped (SIGTERM or "
        "Ctrl-C); what it holds goes back to the queue for the next one.")
    service.add_argument("--queue", default="reduce.xray_centering",
                         help="the queue to consume (default: %(default)s; GPU spot finding sends to "
                              "reduce.xray_centering.gpu)")
    service.add_argument("--broker", metavar="URL|ENVIRONMENT", default=None, help=broker_help("service"))
    service.add_argument("-e", "--environment", metavar="ENV", default=None,
                         help="a zocalo environment of $ZOCALO_CONFIG, as zocalo.service -e takes it (the same as "
                              "--broker ENV); where it names Graylog, the service logs there too")
    service.add_argument("--connect-timeout", type=_seconds, default=CONNECT_TIMEOUT_S, metavar="SECONDS",
                         help=CONNECT_HELP + "; once connected, a lost connection is retried for as long as it runs "
                                              "(default: %(default)s)")
    service.add_argument("--declare", action="store_true",
                         help="declare the queue where it is missing, as Diamond's deployment does (a quorum queue "
                              "with a single active consumer, delivery limit 5, dead-lettering to dlq.QUEUE; Diamond's "
                              "policies: also a 60 s message TTL if it is named xrc.*)")
    service.add_argument("--shards", type=_count, default=None, metavar="N",
                         help="share the work with other instances: route each scan's messages to one of N shard "
                              "queues (a consistent-hash exchange, RabbitMQ's plugin rabbitmq_consistent_hash_exchange)"
                              ", each consumed by one instance at a time")
    service.add_argument("--instance", type=_count, default=None, metavar="K",
                         help="with --shards: this instance's number (0, 1, ...); it takes shard K first and stands "
                              "by for the others")
    service.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                         help="serve Prometheus metrics on this port of 127.0.0.1, 0 for any free one (the port is "
                              "printed; needs prometheus-client: pip install 'zocalo-xrc[metrics]')")
    service.add_argument("--idle-timeout", type=_seconds, default=IDLE_S, metavar="SECONDS",
                         help="abandon a scan that gets no image for this long (default: %(default)s)")
    _logging_options(service, top=False)
    return parser


def _state_options(parser: argparse.ArgumentParser, command: str) -> None:
    default = "a temporary directory, removed when the demo ends" if command == "demo" else \
        "$XDG_STATE_HOME/zocalo-xrc"
    parser.add_argument("--state", type=Path, default=None, metavar="DIR",
                        help=f"where ISPyB (SQLite), the scans' data and the logbook live (default: {default})")
    parser.add_argument("--ispyb", default=None, metavar="URL",
                        help="ISPyB as a SQLAlchemy URL, e.g. mysql+pymysql://user:password@127.0.0.1/ispyb "
                             "(default: SQLite in the state directory)")


def _local_options(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--broker", metavar="in-process|URL|ENVIRONMENT" if command == "demo" else "URL|ENVIRONMENT",
                        required=command == "local up", default=None, help=broker_help(command))
    _state_options(parser, command)
    parser.add_argument("--pia", default="gpu,cpu", metavar="gpu,cpu",
                        help="which per-image analysis runs: GPU at start, CPU at end, or both (default: %(default)s)")
    parser.add_argument("--frame-rate", type=float, default=500.0, metavar="HZ",
                        help="frames per second the simulated detector writes (default: %(default)s)")
    parser.add_argument("--idle-timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="abandon a scan whose images stop coming for this long (default: the service's, "
                             f"{IDLE_S:g} s)")
    parser.add_argument("--frame-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                        help="how long GPU per-image analysis waits for a detector's next frame before it names "
                             "the frames that never came and ends the step (default: %(default)s, as FFS)")


def _local_settings(args: argparse.Namespace) -> Any:
    from .local.settings import Settings

    try:
        return Settings(pia=Settings.parse_pia(args.pia), frame_rate=args.frame_rate, idle_s=args.idle_timeout,
                        frame_timeout_s=args.frame_timeout)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a whole number (0, 1, 2, ...), got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port, 0 to 65535 (0: any free one), got {text!r}")
    return int(text)


def _logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v and --log-level, before or after the command (the command's copy
    leaves the top's value alone unless given)."""
    unset = None if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="log more: -v for INFO (and each reconnection attempt), -vv for DEBUG "
                             "(default: warnings only; INFO for the service)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper, default=unset,
                        help="the log level, instead of -v (default: WARNING; INFO for the service)")


def _configure_logging(args: argparse.Namespace) -> None:
    quiet = "INFO" if args.command == "service" else "WARNING"  # a service says what it does
    level = args.log_level or ("DEBUG" if args.verbose >= 2 else "INFO" if args.verbose == 1 else quiet)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # pika logs every failed connection attempt as ERROR with tracebacks; the
    # command says what went wrong in one line, so pika speaks only at DEBUG.
    logging.getLogger("pika").setLevel(level if level == "DEBUG" else logging.CRITICAL)
    # each reconnection attempt is a WARNING; the command's own error line says why it gave up
    logging.getLogger("zocalo_xrc.messaging.rabbitmq").setLevel(level if level != "WARNING" else logging.ERROR)


class Terminated(BaseException):
    """SIGTERM, raised where the command is so that what it holds (a demo's
    temporary state directory, its services) is cleaned up on the way out."""


def _terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


def _end_as_killed_by(signum: int) -> int:
    """End as a process killed by ``signum`` ends (status 128 + signum in a
    shell), its cleanup done: what well-behaved Unix tools do when a signal
    stops them (``yes | head``: killed by SIGPIPE, 141)."""
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum  # not reached: the signal's default action ends the process


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args)
    on_sigterm = signal.signal(signal.SIGTERM, _terminated)  # service and local up set their own
    try:
        commands = {"demo": run_demo, "service": run_service, "centre": run_centre, "local": run_local,
                    "find-spots": run_find_spots}
        code = commands[args.command](args)
        sys.stdout.flush()  # a reader gone away (| head) is found here, not in Python's last flush
        return code
    except CliError as e:
        return _fail(args, str(e), e.code)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", EXIT_INTERRUPTED)
    except Terminated:  # cleaned up on the way here; end quietly, as SIGTERM's default action does
        return _end_as_killed_by(signal.SIGTERM)
    except BrokenPipeError:
        # The reader went away (| head): say nothing, to anyone, and end as well-behaved Unix tools
        # do (yes | head), killed by SIGPIPE (status 141 in a shell) rather than Python's exit 1 or
        # 120. stdout goes to /dev/null first so that no last flush complains.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _end_as_killed_by(signal.SIGPIPE)
    except OSError as e:
        return _fail(args, f"cannot write the output: {e.strerror or e}", EXIT_FILE)
    except Exception as e:
        log.debug("unexpected error", exc_info=True)
        return _fail(args, f"unexpected error: {type(e).__name__}: {redact(str(e))}", EXIT_INTERNAL)
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)  # main() may run inside another program (tests)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    log.debug("exit %d", code, exc_info=True)
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))  # local add-scan, ...
    print(f"zocalo-xrc {command}: {message}", file=sys.stderr)
    return code


def _input_error(e: Exception, path: Path) -> NoReturn:
    """A file or its content is wrong: say which file."""
    if isinstance(e, OSError):
        raise CliError(f"{e.filename or path}: {e.strerror or e}", EXIT_FILE) from e
    text = str(e)
    raise CliError(text if text.startswith(str(path)) else f"{path}: {text}", EXIT_FILE) from e


def run_centre(args: argparse.Namespace) -> int:
    if args.plot:
        check_plot_path(args.plot)
    try:
        result, grids, geometry = run_case(load_case(args.file))
    except (OSError, ValueError) as e:
        _input_error(e, args.file)
    if args.json:
        print(result_payload(result))
    elif isinstance(result, XrcResults):
        (nx, ny), nz = grids[0][1].shape, grids[1][1].shape[1]
        print(format_3d(result, (nx, ny, nz)))
    else:
        print(format_2d(result))
    if args.plot:
        try:
            plot(result, grids, args.plot, geometry)
        except (OSError, ValueError) as e:
            raise CliError(f"--plot {args.plot}: {getattr(e, 'strerror', None) or e}", EXIT_FILE) from e
        print(f"plot written to {args.plot}", file=sys.stderr)
    return EXIT_OK


def _scan(path: Path | None) -> Any:
    from .local.scan import Scan
    from .local.zocalo import demo_scan

    try:
        return Scan.load(path if path is not None else demo_scan())
    except (OSError, ValueError) as e:
        _input_error(e, path or Path("(the default scan)"))


def _local_errors(e: Exception) -> CliError:
    """A local Zocalo's failure as one line: broker, database or files
    (their messages never hold a password)."""
    if isinstance(e, OSError) and not isinstance(e, TimeoutError):
        return CliError(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", EXIT_FILE)
    return CliError(str(e) or type(e).__name__, EXIT_BROKER)


def run_demo(args: argparse.Namespace) -> int:
    from . import demo
    from ._progress import Progress
    from .client import NoResultsFromZocaloError
    from .local.ispyb import IspybError

    scan = _scan(args.file)
    plot_to = None if str(args.plot).lower() == "none" else args.plot
    if plot_to is not None:
        check_plot_path(plot_to)
    settings = _local_settings(args)
    broker = broker_of(args.broker, "demo")
    from .local.detector import detector_size

    from .local.zocalo import DEMO_DETECTOR

    detector = args.detector if args.detector is not None else (DEMO_DETECTOR if args.file is None else "none")
    try:
        size = None if detector.lower() == "none" else detector_size(detector)
    except ValueError as e:
        raise CliError(f"--detector: {e}", EXIT_USAGE) from None
    try:
        run = demo.Demo(scan, broker=broker, ispyb_url=args.ispyb, settings=settings,
                        state=str(args.state) if args.state else None, name=(args.file.stem if args.file else "demo"),
                        detector=size)
    except (ValueError, ConfigurationError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    try:
        print(f"Local Zocalo: {run.local.describe()}", flush=True)
        outcomes = run.run(timeout_s=args.timeout, progress=Progress(sys.stderr), announce=print)
    except NoResultsFromZocaloError as e:
        raise CliError(str(e), EXIT_ZOCALO) from e
    except BrokenPipeError:
        raise  # the reader went away: main() ends quietly
    except (TransportError, ConfigurationError, IspybError, OSError, TimeoutError) as e:
        raise _local_errors(e) from e
    finally:
        run.local.stop()  # however the demo ends (the output gone, Ctrl-C, SIGTERM): no temporary state left
    geometry = geometry_of(list(scan.grids))
    for o in outcomes:
        # CPU per-image analysis starts at the end: its time counts from there
        timing = (f"{o.after_last_frame_s * 1e3:.1f} ms after the last frame"
                  if o.after_last_frame_s is not None and o.source.value != "cpu"
                  else f"{o.after_end_s * 1e3:.1f} ms after the end")
        print(f"\n{o.source.value.upper()} results ({timing}):")
        if run.spots_drawn is not None and o.source in run.spots_found:
            print(f"  spots: {run.spots_drawn} put on the frames by the model, {run.spots_found[o.source]} found")
        if isinstance(o.results, XrcResults):
            xy, xz = scan.grids
            print(format_3d(o.results, (xy.steps_x, xy.steps_y, xz.steps_y)))
        else:
            print("\n".join(format_2d(r) for r in o.results) or "  no crystal found")
        best = list(o.results)[:1]
        if best and (not isinstance(best[0], GridScan2DResult) or best[0].ok):
            p = geometry.to_motor(best[0])
            print("  best crystal, from the centre of the first box (mm): " +
                  ", ".join(f"{n} = {v:.4f}" for n, v in zip("xyz", p.centre_mm)))
    if plot_to is not None and outcomes and run.registered is not None:
        shown = [(f"{'xy' if k == 0 else 'xz'} (DCID {d})", reshape_grid(scan.counts(k), g))
                 for k, (d, g) in enumerate(zip(run.registered.dcids, scan.grids))]
        first = outcomes[0].results
        result = first if isinstance(first, XrcResults) else (first[0] if first else None)
        if result is not None:  # the model's crystals, moved to the frame of the first box's centre
            half = (0.5 * scan.grids[0].dx_mm, 0.5 * scan.grids[0].dy_mm, 0.5 * scan.grids[-1].dy_mm)
            truth = [([c - h for c, h in zip(x.centre_mm, half)], x.size_mm) for x in scan.crystals]
            plot(result, shown, plot_to, geometry, truth)
            print(f"\nplot written to {plot_to}")
    if args.state:
        print(f"logbook: zocalo-xrc local logbook --state {args.state}")
    return EXIT_OK


def run_local(args: argparse.Namespace) -> int:
    return {"up": run_local_up, "add-scan": run_local_add_scan, "logbook": run_local_logbook}[args.action](args)


def run_local_up(args: argparse.Namespace) -> int:
    import threading

    from .local.zocalo import LocalZocalo, default_state_directory
    from .messaging.rabbitmq import AmqpTransport

    settings = _local_settings(args)
    broker = broker_of(args.broker, "local up")
    assert broker is not None  # local up refuses a broker inside its own process
    try:
        local = LocalZocalo(broker=broker, ispyb_url=args.ispyb, state=args.state or default_state_directory(),
                            settings=settings, processes=True)
    except ConfigurationError as e:
        raise CliError(str(e), EXIT_BROKER) from None
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with AmqpTransport(broker, connect_timeout=None) as probe:
            wait_for_broker(probe, args.connect_timeout)
        local.start()
    except Exception as e:
        raise _local_errors(e) from e
    print(f"local Zocalo up: {local.describe()}", flush=True)
    print(f"register scans with: zocalo-xrc local add-scan FILE --state {local.state.path}"
          + (" --ispyb URL" if args.ispyb else ""), flush=True)
    try:
        stop.wait()  # SIGTERM: exit 0, as a service; Ctrl-C: 130, as every command
    finally:
        local.stop()
    return EXIT_OK


def run_local_add_scan(args: argparse.Namespace) -> int:
    import time

    from .local.detector import detector_size
    from .local.ispyb import Ispyb, IspybError
    from .local.scan import check_name
    from .local.zocalo import (StateDirectory, default_state_directory, prepare_results_queue,
                               register_detector_scan, register_scan)

    scan = _scan(args.file)
    name = args.file.stem if args.name is None else args.name
    try:
        check_name(name)
    except ValueError as e:
        raise CliError(f"--name: {e}", EXIT_USAGE) from None
    try:
        size = None if args.detector is None else detector_size(args.detector)
    except ValueError as e:
        raise CliError(f"--detector: {e}", EXIT_USAGE) from None
    if not args.frame_rate > 0:
        raise CliError(f"--frame-rate: expected frames per second > 0, got {args.frame_rate!r}", EXIT_USAGE)
    state = StateDirectory((args.state or default_state_directory()).resolve())
    detector = None
    try:
        state.path.mkdir(parents=True, exist_ok=True)  # a fresh state directory: ISPyB's SQLite file goes there
        with Ispyb(args.ispyb or state.ispyb_url) as db:
            db.create_schema()
            if size is None:
                registered = register_scan(db, state, scan, name)
            else:
                registered, detector = register_detector_scan(db, state, scan, name, size=size,
                                                              frame_rate=args.frame_rate)
        prepare_results_queue(state, scan.beamline)
    except (IspybError, OSError, ValueError, TransportError) as e:
        raise _local_errors(e) from e
    _print_registered(args, scan, registered, name)
    if detector is not None:
        if not args.json:
            print(f"detector: writing {detector.frames} frame(s) of {size} to {detector.master} at "
                  f"{args.frame_rate:g} frames/s", flush=True)
        started = time.monotonic()
        written = detector.write()
        if not args.json:
            took = time.monotonic() - started
            rate = written / took if took > 0 else float("inf")
            slower = "" if rate >= 0.95 * args.frame_rate else \
                f"; slower than {args.frame_rate:g} frames/s: drawing and compressing a frame here takes longer"
            print(f"detector: {written} frame(s) written in {took:.2f} s ({rate:.0f} frames/s{slower})")
    return EXIT_OK


def _print_registered(args: argparse.Namespace, scan: Any, registered: Any, name: str) -> None:
    from .client import RECIPE, START_FIELDS

    infos = scan.start_infos(registered.dcids, name)
    starts = [{"recipes": [RECIPE], "parameters": {**{f: getattr(i, f) for f in START_FIELDS}, "event": "start"}}
              for i in infos]
    if args.json:
        print(json.dumps({"dcgid": registered.dcgid, "dcids": list(registered.dcids), "beamline": registered.beamline,
                          "visit": registered.visit, "filename": name, "starts": starts}), flush=True)
        return
    kind = "3D" if len(scan.grids) == 2 else "2D"
    print(f"registered a {kind} grid scan on {registered.beamline} ({registered.visit}): DCG {registered.dcgid}, "
          f"{scan.describe_grids(registered.dcids)}, detector file {name!r}")
    how = "one start per grid, then one end per grid" if len(scan.grids) > 1 else "a start, then an end"
    print(f"trigger it as dodal does (dodal.devices.zocalo: {how}):")
    for i in infos:
        print(f"  trigger.run_start(ZocaloStartInfo({i.ispyb_dcid}, {i.filename!r}, {i.start_frame_index}, "
              f"{i.number_of_frames}, {i.message_index}))")
    for dcid in registered.dcids:
        print(f"  trigger.run_end({dcid})")
    print(f"results come on xrc.{registered.beamline} (exchange 'results')", flush=True)


def run_local_logbook(args: argparse.Namespace) -> int:
    from .local.logbook import Logbook, format_run
    from .local.zocalo import StateDirectory, default_state_directory

    book = Logbook(StateDirectory(args.state or default_state_directory()).logbook)
    if not book.location.is_dir():
        raise CliError(f"no logbook at {book.location}: no local Zocalo has run with this state directory "
                       "('zocalo-xrc local up' starts one; or give the --state of the one that ran)", EXIT_FILE)
    if args.guid is None:
        import time as _time

        runs = [r for r in book.runs() if args.dcid is None or str(r["dcid"]) == str(args.dcid)]
        for r in runs:
            started = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(r["t"]))
            parent = f" (started by {r['parent']})" if r["parent"] else ""
            print(f"{r['guid']}  {started}  DCID {r['dcid']}  {r['what']}  {r['messages']} message(s){parent}")
        if not runs:
            print("no runs in the logbook" + (f" for DCID {args.dcid}" if args.dcid is not None else ""))
        return EXIT_OK
    found = book.run(args.guid)
    if not found:
        raise CliError(f"the logbook at {book.location} has no run {args.guid}", EXIT_FILE)
    print(format_run(found, every_image=args.every_image))
    return EXIT_OK


def _zocalo_logging(broker: str | None) -> None:
    """Where the zocalo environment the service runs in names Graylog (or
    zocalo's logging plugin), activate the environment with zocalo itself,
    as ``zocalo.service`` does."""
    path = os.environ.get("ZOCALO_CONFIG")
    if not path or (broker is not None and (broker == "in-process" or looks_like_url(broker))):
        return  # no environment (connecting says what is missing, if anything)
    environment = broker or default_environment()
    if not any(block.get("plugin") in ("graylog", "logging") for _, block in zocalo_environment_blocks(path, environment)):
        return
    try:
        import zocalo.configuration
    except ImportError:
        raise CliError(f"environment {environment!r} of {path} sends logs to Graylog; that needs zocalo: "
                       "pip install 'zocalo-xrc[zocalo]'", EXIT_BROKER) from None
    zocalo.configuration.from_file(path).activate_environment(environment)


def _image_range(text: str) -> tuple[int, int]:
    """``FIRST:LAST`` (or ``N``), images numbered from 1, both included."""
    first, _, last = text.partition(":")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not FIRST:LAST or N: {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"images are numbered from 1 and FIRST <= LAST, not {text!r}")
    return a, b


def _pixels(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        d = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a distance in pixels: {text!r}") from None
    if not 0 <= d < float("inf"):
        raise argparse.ArgumentTypeError(f"a distance in pixels is a number >= 0, not {text!r}")
    return d


def _resolution(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        d = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a resolution in angstrom: {text!r}") from None
    if not d > 0 or d == float("inf"):
        raise argparse.ArgumentTypeError(f"a resolution is a number of angstrom above 0, not {text!r}")
    return d


def run_find_spots(args: argparse.Namespace) -> int:
    from ._progress import Progress
    from .pia.images import ImagesError, open_images
    from .pia.resolution import image_stats

    if args.plot:
        check_plot_path(args.plot)
    if args.d_min is not None and args.d_max is not None and args.d_min > args.d_max:
        raise CliError(f"--d-min {args.d_min} is above --d-max {args.d_max}", EXIT_USAGE)
    try:
        with open_images(args.file) as data:
            first, last = args.images or (1, len(data))
            if last > len(data):
                raise CliError(f"{args.file}: --images {first}:{last}, but it has {len(data)} images", EXIT_FILE)
            shown = args.image if args.image is not None else first
            if args.plot and not first <= shown <= last:
                raise CliError(f"--image {shown} is not among --images {first}:{last}", EXIT_USAGE)
            finder = data.spot_finder(algorithm=args.algorithm, min_spot_size=args.min_spot_size,
                                      max_spot_size=args.max_spot_size or None, max_separation=args.max_separation)
            geometry = data.geometry
            if geometry is None:
                print(f"{args.file}: no detector geometry: every spot counts, no resolution or ice filter",
                      file=sys.stderr)
            elif not args.json:
                print(f"{'image':>6} {'n_spots_total':>13} {'n_spots_no_ice':>14} {'n_spots_4A':>10} "
                      f"{'total_intensity':>15} {'strong_pixels':>13}")
            progress = Progress(sys.stderr)
            started = time.monotonic()
            drawn = None
            found = finder.find_many(data, threads=args.threads, frames=range(first - 1, last))
            for number, spots in enumerate(found, start=first):
                x, y = spots.centroid[:, 0], spots.centroid[:, 1]
                row: dict[str, float | None]
                if geometry is not None:
                    stats = image_stats(x, y, spots.intensity, geometry, d_min=args.d_min, d_max=args.d_max)
                    row = {"file-number": number, "n_spots_total": stats.n_spots_total,
                           "n_spots_no_ice": stats.n_spots_no_ice, "n_spots_4A": stats.n_spots_4A,
                           "total_intensity": stats.total_intensity}
                else:
                    row = {"file-number": number, "n_spots_total": len(spots), "n_spots_no_ice": None,
                           "n_spots_4A": None, "total_intensity": float(spots.intensity.sum())}
                row["num_strong_pixels"] = spots.n_strong_pixels
                progress.done()
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    cells = ["-" if row[k] is None else row[k] for k in
                             ("n_spots_total", "n_spots_no_ice", "n_spots_4A")]
                    print(f"{number:>6} {cells[0]:>13} {cells[1]:>14} {cells[2]:>10} "
                          f"{row['total_intensity']:>15.0f} {spots.n_strong_pixels:>13}", flush=True)
                progress.bar("finding spots", number - first + 1, last - first + 1, time.monotonic() - started,
                             finished=number == last)
                if args.plot and number == shown:
                    drawn = spots
            progress.done()
            if args.plot and drawn is not None:
                from .pia.plot import plot_spots

                try:
                    plot_spots(args.plot, data[shown - 1], drawn.centroid[:, 0], drawn.centroid[:, 1],
                               bounding_boxes=drawn.bounding_box, geometry=geometry, mask=data.mask,
                               trusted_max=data.trusted_max, scale=args.scale,
                               title=f"{args.file.name}, image {shown}: {len(drawn)} spots")
                except (OSError, ValueError) as e:
                    raise CliError(f"--plot {args.plot}: {getattr(e, 'strerror', None) or e}", EXIT_FILE) from e
                print(f"plot of image {shown} written to {args.plot}", file=sys.stderr)
    except ImagesError as e:
        raise CliError(str(e), EXIT_FILE) from e
    except BrokenPipeError:
        raise  # the reader went away: main() ends quietly
    except OSError as e:
        _input_error(e, args.file)
    return EXIT_OK


def run_service(args: argparse.Namespace) -> int:
    import threading

    from .client import connect

    if args.instance is not None and args.shards is None:
        raise CliError("--instance needs --shards", EXIT_USAGE)
    if args.environment is not None:
        if args.broker is not None:
            raise CliError("give --broker or -e ENV, not both", EXIT_USAGE)
        args.broker = args.environment
    if args.shards == 0:
        raise CliError("--shards: expected at least 1", EXIT_USAGE)
    if args.instance is not None and args.instance >= args.shards:
        raise CliError(f"--instance: expected 0..{args.shards - 1} with --shards {args.shards}, got {args.instance}",
                       EXIT_USAGE)
    broker = broker_of(args.broker, "service", "--broker" if args.environment is None else "-e")
    assert broker is not None  # the service refuses a broker inside its own process
    try:
        _zocalo_logging(args.broker)
    except ConfigurationError as e:
        raise CliError(str(e), EXIT_BROKER) from e
    metrics = None
    metrics_port = args.metrics_port
    if args.metrics_port is not None:
        try:
            metrics = ServiceMetrics()
            metrics_port = serve_metrics(args.metrics_port)
        except ImportError as e:
            raise CliError(str(e), EXIT_USAGE) from None
        except OSError as e:
            raise CliError(f"--metrics-port {args.metrics_port}: {e.strerror or e}", EXIT_USAGE) from None
    try:
        transport = connect(broker)
        where = f"RabbitMQ at {broker.url()}"
        wait_for_broker(transport, args.connect_timeout)
        if not transport.queue_exists(args.queue):
            if not args.declare:
                raise CliError(f"there is no queue {args.queue!r} on {where} (--declare makes it, as Diamond's "
                               "deployment declares it)", EXIT_BROKER)
            transport.declare_work_queue(args.queue)
        if args.shards is None:
            service: XrcService | ShardedService = XrcService(transport, args.queue, idle_s=args.idle_timeout,
                                                              metrics=metrics).start()
            how = ""
        else:
            service = ShardedService(transport, args.queue, args.shards, instance=args.instance,
                                     idle_s=args.idle_timeout, metrics=metrics).start()
            how = f" in {args.shards} shards" + ("" if args.instance is None else f", instance {args.instance}")
    except (ConfigurationError, TransportError) as e:
        raise CliError(str(e), EXIT_BROKER) from e
    metrics_note = "" if metrics_port is None else f"; metrics on http://127.0.0.1:{metrics_port}/metrics"
    print(f"X-ray centring service consuming {args.queue}{how} on {where}{metrics_note}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    code = EXIT_OK
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    service.stop()
    print(f"stopped: {service.completed} result(s) sent, {service.rejected} message(s) dead-lettered; "
          f"{len(service.open)} open scan(s) left to the queue", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
