"""Writing an artifact folder: the file kinds a manifest owns and the one transaction every writer
commits through (export, `calibrate int8|fp16|threshold`, `build-engine`, `fuse`).

A transaction holds the folder's lock (``plumbing.folder_lock``) from start to end, reads the
manifest once, and lets the writer add files and edit a working copy of the manifest. Files are
written under content-addressed names (``visual.<sha12>.onnx``) beside the ones the current manifest
names, which are never overwritten. At the commit the transaction:

1. carries forward what the writer did not touch: a derived model (int8, fp16, fused) stays while
   the visual model it was made from is unchanged, an engine while the model file it was built from
   is still in the folder, the thresholds file always (classes whose thresholds no longer fit are
   named as stale: loading ignores them);
2. drops a derived file whose source changed, with one line naming the command that remakes it;
3. lists every named file with its sha256, appends the history line, and replaces ``manifest.json``:
   the one commit point;
4. removes owned files no manifest names any more (and what killed runs left).

Leaving the transaction without a commit, or an exception anywhere, removes the files it wrote and
leaves the folder as it was. A new kind of file is one ``FileKind`` in ``vocabulary.FILE_KINDS``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .artifacts import MANIFEST, Manifest, content_addressed, read_manifest, write_manifest
from .errors import AnoclipError, ArtifactError
from .integrity import resolve_inside, sha256_file
from .plumbing import atomic_path, atomic_write_bytes, folder_lock, sync_folder
from .vocabulary import DERIVED_MODELS, FUSED, KINDS, TEXT, VISUAL, file_kind, remake_command

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"


@dataclass
class CommitReport:
    """What a commit did beyond the writer's own change."""

    dropped: list[str] = field(default_factory=list)  # lines: what was dropped and the command that remakes it
    stale: list[str] = field(default_factory=list)  # lines: what stays but no longer fits
    removed: list[str] = field(default_factory=list)  # files deleted after the commit


class FolderTransaction:
    """A writer's view of the folder between lock and commit (see the module docstring).

    ``old``: the committed manifest (None for an empty folder); ``manifest``: the working copy the
    writer edits (None until the writer sets one, for an empty folder).
    """

    def __init__(self, folder: Path, old: Manifest | None, report: Callable[[str], None]):
        self.folder = folder
        self.old = old
        self.manifest = copy.deepcopy(old)
        self.report = report
        self.written: dict[str, str] = {}  # name -> sha256 of the files this transaction placed
        self.created: list[str] = []  # of those, the ones that were not in the folder before
        self.removed_engines: set[str] = set()  # engines the writer replaces
        self.removed_models: set[str] = set()  # derived models the writer takes out
        self.committed = False

    # -- adding files ---------------------------------------------------------------------------

    def add_file(self, base_name: str, source: Path | bytes, move: bool = False) -> str:
        """Place ``source`` (a file, moved with ``move``, or bytes) in the folder under the
        content-addressed form of ``base_name``; its final name. The same content already there
        is not written again."""
        if file_kind(content_addressed(base_name, "0" * 64)) is None:
            raise ValueError(f"{base_name} is not a kind of file the manifest owns")
        if isinstance(source, bytes):
            sha = hashlib.sha256(source).hexdigest()
        else:
            sha = sha256_file(source)
        name = content_addressed(base_name, sha)
        target = self.folder / name
        present = target.is_file() and not target.is_symlink() and (
            (self.old is not None and self.old.files.get(name) == sha) or sha256_file(target) == sha)
        if not present:
            if name not in self.created:
                self.created.append(name)
            if isinstance(source, bytes):
                atomic_write_bytes(target, source)
            elif move:
                os.replace(source, target)
            else:
                with atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
        elif move and not isinstance(source, bytes):
            Path(source).unlink()
        self.written[name] = sha
        return name

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh staging folder inside the folder (same file system: placing is a rename)."""
        with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=self.folder) as staging:
            yield Path(staging)

    def add_engine(self, plan: bytes, sidecar_json: bytes, engine_name: str) -> None:
        """Place an engine (its content-addressed ``engine_name``) and its sidecar."""
        for name, data in ((engine_name, plan), (engine_name + ".json", sidecar_json)):
            target = self.folder / name
            if name not in self.created and not target.exists():
                self.created.append(name)
            atomic_write_bytes(target, data)
            self.written[name] = hashlib.sha256(data).hexdigest()

    def remove_model(self, name: str) -> None:
        """Take a model out of the folder at the commit (a derived one is not carried forward)."""
        self.removed_models.add(name)
        if self.manifest is not None:
            self.manifest.models.pop(name, None)

    def remove_engine(self, engine_name: str) -> None:
        """Take an engine (and its sidecar) out of the folder at the commit."""
        self.removed_engines.add(engine_name)

    def require_source(self, model: str, sha256: str, command: str) -> None:
        """Refuse to commit a file made from ``model`` when the folder's ``model`` is no longer the
        file of ``sha256`` (another writer replaced it meanwhile)."""
        current = self.model_sha256(model)
        if current != sha256:
            raise AnoclipError(f"the {model} model of {self.folder} changed while this ran (sha256 {sha256[:12]} -> "
                               f"{current[:12] or 'none'}); nothing was written, run `{command}` again")

    def model_sha256(self, model: str) -> str:
        entry = self.manifest.models.get(model) if self.manifest is not None else None
        if entry is None:
            return ""
        return self.written.get(entry.file) or (self.old.files.get(entry.file, "") if self.old else "")

    # -- committing -----------------------------------------------------------------------------

    def commit(self, history: str) -> CommitReport:
        """Reconcile, list, write the manifest (the commit point) and prune; see the module docstring."""
        manifest = self.manifest
        if manifest is None:
            raise ValueError("nothing to commit: the writer set no manifest")
        known = dict(self.old.files) if self.old else {}
        known.update(self.written)
        report = CommitReport()
        self._carry_models(manifest, known, report)
        engines = self._carry_engines(manifest, known, report)
        if not manifest.thresholds and self.old is not None and self.old.thresholds:
            manifest.thresholds = self.old.thresholds
        if not manifest.memory and self.old is not None and self.old.memory:
            manifest.memory = self.old.memory
        self._check_memory(manifest, known, report)
        named = [entry.file for entry in manifest.models.values()] + [manifest.prompts]
        named += [manifest.thresholds] if manifest.thresholds else []
        named += [manifest.memory] if manifest.memory else []
        if TEXT not in manifest.models:  # the text tower's vocabulary and recipe go with it
            manifest.text_vocabulary = manifest.text_recipe = ""
        named += [n for n in (manifest.text_vocabulary, manifest.text_recipe) if n]
        named += [n for engine in engines for n in (engine, engine + ".json")]
        # files a manifest lists that are no kind of ours (external data of a graph) stay while listed
        named += [n for n in (self.old.files if self.old else {}) if file_kind(n) is None]
        missing = [n for n in named if n not in known]
        if missing:
            raise ArtifactError(f"{self.folder}: {missing[0]} is named but was never written; nothing was committed")
        manifest.files = {n: known[n] for n in dict.fromkeys(named)}
        self._report_stale_thresholds(manifest, report)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest.history.append(f"{now} {history}")
        write_manifest(self.folder, manifest)  # the commit point
        sync_folder(self.folder)
        self.committed = True
        self.old = manifest
        report.removed = prune(self.folder, set(manifest.files))
        for line in report.dropped + report.stale:
            self.report(line)
        return report

    def _carry_models(self, manifest: Manifest, known: dict[str, str], report: CommitReport) -> None:
        """Derived models of the old manifest the writer left out come back while their source is
        unchanged; any whose source changed is dropped with the command that remakes it."""
        if self.old is not None:
            for name, entry in self.old.models.items():
                if name in manifest.models or name in self.removed_models:
                    continue
                if name in DERIVED_MODELS:
                    manifest.models[name] = copy.deepcopy(entry)
                elif name in KINDS:  # an exported model the new export was not asked for
                    report.dropped.append(f"dropping {name}: this export did not make it; make it anew with "
                                          f"`{remake_command(name, self.folder)}`")
        visual = manifest.models.get(VISUAL)
        visual_sha = known.get(visual.file, "") if visual is not None else ""
        for name in [n for n, e in manifest.models.items() if e.source_sha256]:
            entry = manifest.models[name]
            if entry.source_sha256 != visual_sha:
                del manifest.models[name]
                report.dropped.append(f"dropping {name}: it was made from another visual model (sha256 "
                                      f"{entry.source_sha256[:12]}, now {visual_sha[:12]}); make it anew with "
                                      f"`{remake_command(name, self.folder)}`")
            elif name == FUSED:
                self._check_fused(entry, manifest, report)

    def _check_fused(self, entry, manifest: Manifest, report: CommitReport) -> None:
        """The fused graph bakes classes' text features: a class re-encoded or dropped makes it
        wrong (dropped); a class added makes it partial (said); thresholds baked into it (``fuse
        --thresholds``) that are no longer the folder's calibrated ones make it stale (said); so do
        memories of normal frames baked into it that are no longer the folder's (said)."""
        from .thresholds import text_features_sha256

        bank = self._prompts(manifest)
        if bank is None:
            return
        baked = entry.provenance.get("classes", [])
        shas = entry.provenance.get("text_sha256", {})
        changed = [c for c in baked if c not in bank.classes or shas.get(c) != text_features_sha256(
            bank.get(c).text_features)]
        remake = remake_command(FUSED, self.folder)
        if changed:
            del manifest.models[FUSED]
            report.dropped.append(f"dropping fused: class(es) {', '.join(changed)} were re-encoded or removed since it "
                                  f"was made; make it anew with `{remake}`")
            return
        added = sorted(set(bank.classes) - set(baked))
        if added and entry.file not in self.written:  # a fuse of chosen classes is not news to its writer
            report.stale.append(f"the fused model holds {', '.join(baked)} but not {', '.join(added)}; "
                                f"`{remake}` makes it with every class")
        decided = entry.provenance.get("thresholds")
        if decided and entry.file not in self.written:  # thresholds baked in (fuse --thresholds): still the folder's?
            from .thresholds import read_thresholds

            name = manifest.thresholds or (self.old.thresholds if self.old is not None else "")
            try:
                table = read_thresholds(resolve_inside(self.folder, name)).classes if name else {}
            except (ArtifactError, OSError, ValueError):
                table = {}
            moved = [c for c, t in decided["classes"].items()
                     if c not in table or (table[c].image, table[c].pixel) != (t["image"], t["pixel"])]
            if moved:
                report.stale.append(f"the fused model's baked thresholds of {', '.join(moved)} are no longer the "
                                    f"folder's calibrated ones; `{remake} --classes {','.join(baked)} --thresholds` "
                                    "bakes the current ones")
        remembered = entry.provenance.get("memory")
        if remembered and entry.file not in self.written:  # memories baked in: still the folder's?
            from .memory import read_memory

            try:
                current = read_memory(resolve_inside(self.folder, manifest.memory)).classes if manifest.memory else {}
            except (ArtifactError, OSError, ValueError):
                current = {}
            moved = [c for c, m in remembered.items() if c not in current or current[c].sha256 != m.get("sha256")]
            if moved:
                how = (" --memory only" if entry.provenance.get("memory_mode") == "only" else
                       f" --memory-weight {entry.provenance.get('memory_weight'):g}")
                report.stale.append(f"the fused model's baked memory of normal frames of {', '.join(moved)} is no "
                                    f"longer the folder's; `{remake} --classes {','.join(baked)}{how}` bakes the "
                                    "current one (predicting with it is refused until then)")

    def _check_memory(self, manifest: Manifest, known: dict[str, str], report: CommitReport) -> None:
        """The memory holds tokens of one visual model: it goes (with the command that remakes it)
        when the folder's visual model is another."""
        from .memory import memory_metadata

        if not manifest.memory:
            return
        visual = manifest.models.get(VISUAL)
        visual_sha = known.get(visual.file, "") if visual is not None else ""
        try:
            made_from = memory_metadata(resolve_inside(self.folder, manifest.memory)).get("visual_sha256", "")
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a damaged header
            made_from = f"unreadable ({exc})"
        if made_from != visual_sha:
            report.dropped.append(f"dropping {manifest.memory}: it holds tokens of another visual model; make each "
                                  f"class's memory anew with `{remake_command('memory', self.folder)}`")
            manifest.memory = ""

    def _memories(self, manifest: Manifest) -> dict[str, str]:
        """class -> sha256 of its memory rows, in the memory file ``manifest`` names."""
        from .memory import read_memory

        if not manifest.memory:
            return {}
        try:
            return {c: m.sha256 for c, m in read_memory(resolve_inside(self.folder, manifest.memory)).classes.items()}
        except ArtifactError as exc:
            log.warning("%s", exc)
            return {}

    def _prompts(self, manifest: Manifest):
        from .prompt_weights import read_prompts

        try:
            path = resolve_inside(self.folder, manifest.prompts)
            return read_prompts(path) if path.is_file() else None
        except ArtifactError as exc:
            log.warning("%s", exc)
            return None

    def _carry_engines(self, manifest: Manifest, known: dict[str, str], report: CommitReport) -> list[str]:
        """Engines (old and new) whose source model file is still one of the manifest's models; the
        others are dropped with the command that rebuilds them."""
        from .engine import parse_sidecar

        model_shas = {known.get(e.file, "") for e in manifest.models.values()}
        candidates = sorted(n for n in known if KINDS["engine"].pattern.match(n) and n + ".json" in known)
        kept = []
        for name in candidates:
            if name in self.removed_engines:
                continue
            try:
                sidecar = parse_sidecar((self.folder / (name + ".json")).read_bytes(), name + ".json", self.folder)
            except (OSError, ArtifactError) as exc:
                report.dropped.append(f"dropping {name}: its sidecar cannot be read ({exc})")
                continue
            if sidecar.source_sha256 not in model_shas:
                report.dropped.append(
                    f"dropping {name}: it was built from {sidecar.source_file}, which the folder no longer holds; "
                    f"rebuild it with `{remake_command('engine', self.folder, precision=sidecar.precision)}`")
                continue
            kept.append(name)
        return kept

    def _report_stale_thresholds(self, manifest: Manifest, report: CommitReport) -> None:
        """Classes whose calibrated thresholds no longer fit the model file or class embeddings."""
        if not manifest.thresholds or (self.old is not None and manifest.thresholds == self.old.thresholds
                                       and manifest.models == self.old.models and manifest.prompts == self.old.prompts
                                       and manifest.memory == self.old.memory):
            return
        from .thresholds import read_thresholds, text_features_sha256

        try:
            table = read_thresholds(self.folder / manifest.thresholds)
        except ArtifactError as exc:
            report.stale.append(str(exc))
            return
        bank = self._prompts(manifest)
        memories = self._memories(manifest)
        for cls, record in table.classes.items():
            entry = manifest.models.get(record.model)
            reasons = []
            if record.memory != "off" and (cls not in memories or memories[cls] != record.memory_sha256):
                reasons.append("the class's memory of normal frames changed" if cls in memories
                               else "the memory of normal frames it was calibrated with is gone")
            if entry is None or manifest.files.get(entry.file) != record.model_sha256:
                reasons.append(f"the {record.model} model changed")
            if bank is not None and (cls not in bank.classes or text_features_sha256(
                    bank.get(cls).text_features) != record.text_features_sha256):
                reasons.append("its text embeddings changed" if cls in bank.classes else "the class is gone")
            if reasons:
                report.stale.append(f"thresholds of {cls} are stale ({'; '.join(reasons)}) and will not be applied; "
                                    f"recalibrate with `{remake_command('thresholds', self.folder, cls=cls)}`")

    def undo(self) -> None:
        """Remove the files this transaction wrote that no manifest names."""
        for name in self.created:
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()


@contextlib.contextmanager
def transaction(folder: str | os.PathLike, wait: float = 0.0, report: Callable[[str], None] = log.warning,
                read: Callable[[Path], Manifest | None] | None = None) -> Iterator[FolderTransaction]:
    """Lock ``folder``, read its manifest, clear what killed runs left, and yield a
    :class:`FolderTransaction`; without a commit, or on any error, its files are removed again.

    ``read``: how to read the committed manifest (default: ``read_manifest``, which raises on a
    folder that has none); ``wait``: seconds to wait for another writer's lock.
    """
    folder = Path(folder)
    with folder_lock(folder, wait=wait):
        old = (read or read_manifest)(folder)
        prune(folder, set(old.files) if old else set())
        tx = FolderTransaction(folder, old, report)
        try:
            yield tx
        finally:
            if not tx.committed:
                tx.undo()


def prune(folder: Path, keep: set[str]) -> list[str]:
    """Remove staging folders, temporary files and owned files ``keep`` does not name; hold the
    folder's lock."""
    removed = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        staging = name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink()
        temporary = name.startswith(".") and name.endswith(".tmp") and not entry.is_dir()
        unnamed = name != MANIFEST and file_kind(name) is not None and name not in keep and not entry.is_dir()
        if not (staging or temporary or unnamed):
            continue
        try:
            shutil.rmtree(entry) if staging else entry.unlink()
        except OSError as exc:
            log.warning("could not remove %s: %s", entry, exc)
            continue
        removed.append(name)
    if removed:
        log.debug("removed from %s: %s", folder, ", ".join(removed))
    return removed


def store_derived_model(folder: str | os.PathLike, name: str, staged: Path, entry, command: str,
                        base_name: str | None = None, wait: float = 5.0,
                        report: Callable[[str], None] = log.warning) -> str:
    """Commit a model made from the folder's visual model (``entry.source_sha256``) as manifest
    model ``name`` (file ``base_name``, default ``<name>.onnx``, content-addressed); the file name.
    The visual model must still be the one it was made from."""
    with transaction(folder, wait=wait, report=report) as tx:
        tx.require_source(VISUAL, entry.source_sha256, remake_command(name, folder))
        entry.file = tx.add_file(base_name or f"{name}.onnx", staged)
        tx.manifest.models[name] = entry
        tx.commit(command)
    return entry.file
