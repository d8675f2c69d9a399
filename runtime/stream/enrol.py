"""Self-enrolment on the line (``anoclip stream --enrol``): the stream builds its class's memory of
normal frames and its thresholds from its own first frames, commits both, then inspects; with
``continuous``, frames that pass with a margin keep refreshing them at a bounded rate.

**Initial enrolment.** After ``skip`` warm-up frames, the next ``frames`` frames of every source of
a class are taken as normal: they are scored (events say ``phase: enrolling`` and carry no
decision) and their raw patch tokens kept. When every source of the class has given its share,
the kept frames are split in turn: the even ones make the memory (added to the class's memory in
force, if any; coreset above ``max_patches``), the odd ones are scored against that new memory,
and the thresholds are taken from those scores (quantile, or the conformal rule with a
false-alarm rate: frames the memory never saw, so exchangeable with the frames to come). Memory
and thresholds are committed in one transaction of the folder, put in force, and the class turns
to ``inspecting``. This runs on the inference worker: live sources drop frames meanwhile (counted).

**Continuous.** An inspected frame joins only when it passes with a margin: decided normal, no
region, score at most the image threshold minus ``margin``, and no anomalous frame of its source
within ``quiet`` frames before or after it (it waits ``quiet`` frames before it joins). Joined
frames go in turn to two windows of the ``window`` most recent ones: one refreshes the memory
(the initial enrolment's rows are always kept, the window's rows added, coreset above
``max_patches``), the other the thresholds (scored against the refreshed memory, which never
holds them). A refresh runs on a thread of its own at most once per ``refresh_s`` seconds,
commits through the folder's transaction (a crash leaves the old or the new folder) and is put in
force at the next frame. ``freeze()`` stops refreshes (SIGUSR1 toggles it in ``anoclip stream``).

What keeps a defect out of the memory: a frame the thresholds in force call anomalous never joins,
nor do its neighbours; refreshes are rate-bounded; the enrolled rows are never dropped; the
operator can freeze. What does not: a defect that grows so slowly that every frame of it passes
with the margin can be learned; freeze the memory when the line's normal look is settled.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..memory import DEFAULT_MAX_PATCHES, ClassMemory, unit_rows
from ..normal_frames import (ThresholdSettings, build_class_memory, current_memory, current_thresholds, map_sample,
                             store_normal_frames, threshold_record)
from ..artifacts import VISUAL, read_manifest
from ..errors import AnoclipError
from ..thresholds import memory_setting

log = logging.getLogger(__name__)

ENROLLING, INSPECTING = "enrolling", "inspecting"


@dataclass(frozen=True)
class EnrolSettings:
    """How a stream enrols (see the module docstring)."""

    frames: int  # per source, taken as normal after the warm-up
    skip: int = 0  # warm-up frames per source, not used
    continuous: bool = False
    thresholds: ThresholdSettings = ThresholdSettings()
    max_patches: int = DEFAULT_MAX_PATCHES
    refresh_s: float = 300.0  # continuous: at most one refresh per this many seconds
    window: int = 64  # continuous: most recent joined frames per window (memory, thresholds); a refresh waits
    # until both are full and half of the frames in them are new
    margin: float = 0.0  # continuous: a frame joins with score <= image threshold - margin
    quiet: int = 10  # continuous: and no anomalous frame within this many frames of it

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"enrolment needs at least 2 frames per source (memory and thresholds), got {self.frames}")
        needed = self.thresholds.frames_needed()
        if self.continuous and self.window < needed:
            raise ValueError(f"the thresholds of a refresh come from the window of {self.window} frames, and the "
                             f"false-alarm rate needs {needed}: give --enrol-window {needed} or more")
        if self.frames // 2 < needed:
            raise ValueError(f"the thresholds are taken from every other enrolment frame ({self.frames // 2} of "
                             f"{self.frames}), and the false-alarm rate needs {needed}: enrol at least {2 * needed} "
                             "frames per source")


@dataclass
class Kept:
    """One frame kept for enrolment: what scoring it again against another memory needs."""

    tokens: np.ndarray  # raw patch tokens [tiles, M, D]
    zero_shot_score: float
    layout: object
    size: tuple[int, int]
    source: str
    index: int


@dataclass
class ClassState:
    phase: str
    sources: dict[str, list[int]]  # source -> [frames seen, frames kept]
    kept: list[Kept] = field(default_factory=list)
    base: np.ndarray | None = None  # the enrolled memory rows, always kept by refreshes
    floor: tuple[float, float] | None = None  # the enrolled (image, pixel) thresholds: refreshes stay at or above
    memory_window: collections.deque = field(default_factory=collections.deque)
    threshold_window: collections.deque = field(default_factory=collections.deque)
    joined: int = 0  # frames joined since the last refresh
    turn: int = 0
    last_refresh: float = 0.0
    pending: dict[str, collections.deque] = field(default_factory=dict)  # source -> frames waiting out ``quiet``
    last_alarm: dict[str, int] = field(default_factory=dict)
    refreshing: threading.Thread | None = None
    ready: tuple | None = None  # (bank, table, versions) of a finished refresh, put in force on the next frame
    refreshes: int = 0


class Enrolment:
    """The self-enrolment of one stream run over ``detector``'s folder; ``observe`` every scored
    frame (inference worker), ``close`` at the end."""

    def __init__(self, detector, sources: dict[str, str], settings: EnrolSettings, command: str = "anoclip stream"):
        """``sources``: source name -> its class (one class per source)."""
        if getattr(detector, "model", VISUAL) == "fused" or not hasattr(detector, "score_tokens"):
            raise AnoclipError("--enrol needs the model's patch tokens here: run it with a local --model visual, not "
                               "--model fused or --server")
        if detector.memory == "off":
            raise AnoclipError("--enrol builds a memory of normal frames: use it with --memory auto, on or only")
        if detector.tta is not None and settings.continuous:
            raise AnoclipError("--enrol continuous scores kept frames again against a refreshed memory, which TTA's "
                               "per-frame adaptation does not allow; run it without --tta")
        self.detector = detector
        self.settings = settings
        self.command = command
        self.frozen = False
        self.lock = threading.Lock()
        self.classes: dict[str, ClassState] = {}
        for name, cls in sources.items():
            state = self.classes.setdefault(cls, ClassState(ENROLLING, {}))
            state.sources[name] = [0, 0]
        manifest = read_manifest(detector.artifacts.folder)
        self.versions = {"memory": manifest.memory or None, "thresholds": manifest.thresholds or None}
        for cls, state in self.classes.items():
            state.memory_window = collections.deque(maxlen=settings.window)
            state.threshold_window = collections.deque(maxlen=settings.window)
            if settings.continuous and detector.class_memory(cls) is not None and detector.calibration(cls) is not None:
                state.phase = INSPECTING  # memory and thresholds in force: refresh them, no initial enrolment
                state.base = detector.class_memory(cls).patches
                state.floor = (detector.calibration(cls).image, detector.calibration(cls).pixel)
                state.last_refresh = time.monotonic()

    # -- per frame (inference worker) -------------------------------------------------------------

    def wants_tokens(self, cls: str) -> bool:
        state = self.classes.get(cls)
        return state is not None and (state.phase == ENROLLING or self.settings.continuous)

    def observe(self, source: str, index: int, result) -> dict:
        """Account a scored frame of ``source`` (its ``index`` in the source); the fields its record
        gains (``phase``, ``calibration``). An enrolling frame's decision is cleared."""
        state = self.classes[result.cls]
        self._put_in_force(result.cls, state)
        if state.phase == ENROLLING:
            seen_kept = state.sources[source]
            seen_kept[0] += 1
            if seen_kept[0] > self.settings.skip and seen_kept[1] < self.settings.frames:
                state.kept.append(self._kept(result, source, index))
                seen_kept[1] += 1
            result.anomalous, result.regions, result.threshold = None, [], None
            fields = self._fields(ENROLLING)
            if all(kept >= self.settings.frames for _, kept in state.sources.values()):
                self._enrol(result.cls, state)
            return fields
        if self.settings.continuous and result.patch_tokens is not None:
            self._consider(result.cls, state, source, index, result)
        return self._fields(INSPECTING)

    def _fields(self, phase: str) -> dict:
        return {"phase": phase, "calibration": dict(self.versions)}

    @staticmethod
    def _kept(result, source: str, index: int) -> Kept:
        return Kept(result.patch_tokens, float(result.zero_shot_score), result.layout, tuple(result.image_size), source,
                    index)

    # -- initial enrolment --------------------------------------------------------------------------

    def _enrol(self, cls: str, state: ClassState) -> None:
        detector = self.detector
        kept, state.kept = state.kept, []
        old = detector.class_memory(cls)
        log.info("enrolment of %s: %d frames from %s; building the memory and thresholds", cls, len(kept),
                 ", ".join(state.sources))
        rows, before, radius = build_class_memory(unit_rows(np.concatenate([k.tokens for k in kept[0::2]])),
                                                  self.settings.max_patches, old)
        memory = self._class_memory(cls, rows, kept[0::2], before, radius, extended=old is not None)
        bank, table = self._commit(cls, memory, kept[1::2])
        state.base = rows
        state.floor = (table.classes[cls].image, table.classes[cls].pixel)
        state.phase = INSPECTING
        state.last_refresh = time.monotonic()
        self._use(bank, table)
        record = table.classes[cls]
        log.info("enrolment of %s done: memory %d rows (%d before the coreset), image threshold %.6g from %d frames "
                 "(%s), pixel threshold %.6g; inspecting", cls, len(rows), before, record.image, record.frames,
                 record.rule, record.pixel)

    def _class_memory(self, cls: str, rows: np.ndarray, frames: list[Kept], before: int, radius: float,
                      extended: bool) -> ClassMemory:
        detector = self.detector
        return ClassMemory(cls, rows, {
            "frames": len(frames), "new_frames": len(frames), "patches": before, "kept": len(rows),
            "max_patches": self.settings.max_patches, "covering_radius": radius,
            "coreset": "greedy k-center" if before > len(rows) else "none", "augment": [], "model": detector.model,
            "precision": detector.precision, "model_sha256": detector.artifacts.model_sha256(detector.model),
            "tiling": detector.tiling, "extended": extended, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": self.command, "normal": sorted({f"stream:{k.source}" for k in frames}), "enrolled": True})

    def _commit(self, cls: str, memory: ClassMemory, threshold_frames: list[Kept], floor: tuple[float, float] | None = None):
        """Score ``threshold_frames`` against ``memory``, take the thresholds, commit both; (bank, table).

        ``floor``: (image, pixel) the thresholds do not go below (a refresh: its frames passed the
        thresholds in force, so their order statistics can only fall; the rule's margins are raised
        to keep them at the floor, which the record then states)."""
        detector = self.detector
        scores, samples = [], []
        for i, k in enumerate(threshold_frames):
            result = detector.score_tokens(cls, k.tokens, k.zero_shot_score, k.layout, k.size, memory.patches)
            scores.append(result.score)
            samples.append(map_sample(result.anomaly_map_full, i))
        setting = memory_setting("only" if detector.memory == "only" else "on", detector.memory_weight, memory.sha256)
        settings = self.settings.thresholds
        record = threshold_record(detector, cls, scores, samples, settings, memory=setting,
                                  normal=sorted({f"stream:{k.source}" for k in threshold_frames}), command=self.command)
        if floor is not None and (record.image < floor[0] or record.pixel < floor[1]):
            settings = dataclasses.replace(settings, margin=settings.margin + max(0.0, floor[0] - record.image),
                                           pixel_margin=settings.pixel_margin + max(0.0, floor[1] - record.pixel))
            record = threshold_record(detector, cls, scores, samples, settings, memory=setting,
                                      normal=record.normal, command=self.command)
        folder = detector.artifacts.folder
        store_normal_frames(folder, cls, memory=memory, visual_sha256=detector.artifacts.model_sha256(VISUAL),
                            record=record, command=f"{self.command} (enrolment of {cls})")
        manifest = read_manifest(folder)
        with self.lock:
            self.versions = {"memory": manifest.memory or None, "thresholds": manifest.thresholds or None}
        return current_memory(folder, manifest), current_thresholds(folder, manifest)

    def _use(self, bank, table) -> None:
        self.detector.use_calibration(memory=bank, thresholds=table)

    # -- continuous ---------------------------------------------------------------------------------

    def freeze(self, frozen: bool | None = None) -> bool:
        """Stop (or, with False, resume) refreshes; None toggles. The new state."""
        self.frozen = (not self.frozen) if frozen is None else frozen
        log.warning("enrolment %s", "frozen: the memory and thresholds stay as they are" if self.frozen else
                    "resumed: passing frames refresh the memory and thresholds again")
        return self.frozen

    def _consider(self, cls: str, state: ClassState, source: str, index: int, result) -> None:
        s = self.settings
        pending = state.pending.setdefault(source, collections.deque())
        if result.anomalous:
            pending.clear()
            state.last_alarm[source] = index
        elif (result.anomalous is False and not result.regions and result.threshold is not None
              and result.threshold.image is not None and result.score <= result.threshold.image - s.margin
              and index - state.last_alarm.get(source, -10**9) > s.quiet):
            pending.append(self._kept(result, source, index))
        while pending and pending[0].index <= index - s.quiet:
            frame = pending.popleft()
            (state.memory_window if state.turn % 2 == 0 else state.threshold_window).append(frame)
            state.turn += 1
            state.joined += 1
        due = (not self.frozen and state.refreshing is None and state.ready is None
               and time.monotonic() - state.last_refresh >= s.refresh_s and state.joined >= s.window
               and len(state.memory_window) == len(state.threshold_window) == s.window)
        if due:
            state.joined = 0
            memory_frames, threshold_frames = list(state.memory_window), list(state.threshold_window)
            state.refreshing = threading.Thread(target=self._refresh, args=(cls, state, memory_frames, threshold_frames),
                                                name=f"enrol-{cls}", daemon=True)
            state.refreshing.start()

    def _refresh(self, cls: str, state: ClassState, memory_frames: list[Kept], threshold_frames: list[Kept]) -> None:
        try:
            started = time.perf_counter()
            recent = unit_rows(np.concatenate([k.tokens for k in memory_frames]))
            base = ClassMemory(cls, state.base) if state.base is not None else None
            rows, before, radius = build_class_memory(recent, self.settings.max_patches, base)
            memory = self._class_memory(cls, rows, memory_frames, before, radius, extended=base is not None)
            bank, table = self._commit(cls, memory, threshold_frames, floor=state.floor)
            state.ready = (bank, table)
            state.refreshes += 1
            record = table.classes[cls]
            log.info("refreshed %s from %d + %d passing frames in %.1f s: memory %d rows, image threshold %.6g, "
                     "pixel threshold %.6g", cls, len(memory_frames), len(threshold_frames),
                     time.perf_counter() - started, len(rows), record.image, record.pixel)
        except Exception as exc:  # the old memory and thresholds stay in force
            log.error("refreshing the memory and thresholds of %s failed (the ones in force stay): %s", cls, exc)
        finally:
            state.last_refresh = time.monotonic()
            state.refreshing = None

    def _put_in_force(self, cls: str, state: ClassState) -> None:
        if state.ready is not None:
            bank, table = state.ready
            state.ready = None
            self._use(bank, table)

    # -- end ----------------------------------------------------------------------------------------

    def close(self) -> dict:
        """Wait for a refresh in flight; warn about classes whose enrolment did not finish; the
        summary's ``enrolment`` entry."""
        summary = {}
        for cls, state in self.classes.items():
            thread = state.refreshing
            if thread is not None:
                thread.join()
            self._put_in_force(cls, state)
            if state.phase == ENROLLING:
                got = ", ".join(f"{name} {kept}" for name, (_, kept) in state.sources.items())
                log.warning("enrolment of %s did not finish: it needs %d frames per source after %d warm-up frames "
                            "(got %s); nothing was committed for it", cls, self.settings.frames, self.settings.skip, got)
            summary[cls] = {"phase": state.phase, "refreshes": state.refreshes, "frozen": self.frozen}
        summary["calibration"] = dict(self.versions)
        return summary
