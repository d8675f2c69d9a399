"""Encoding classes on the device: the folder's text tower (``anoclip-export --text-tower``) run by
onnxruntime on the tokens of the runtime's tokenizer, and the class's t+/t- and T made from the
sentences of the folder's text recipe exactly as the export makes them (``prompts.py``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from .artifacts import read_manifest, text_tower_files, verify_files
from .errors import AnoclipError, ArtifactError
from .integrity import resolve_inside
from .prompt_weights import ClassPrompts, PromptBank, read_prompts
from .prompts import PromptRecipe, PromptTables, class_embeddings, type_embeddings

log = logging.getLogger(__name__)

BATCH = 64  # sentences per run of the text model


class TextEncoder:
    """The text tower of an artifact folder, ready to encode classes."""

    def __init__(self, folder: str | os.PathLike, backend: str = "cpu", threads: int | None = None,
                 verify: bool = True):
        from .tokenizer import Tokenizer

        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        verify_files(self.folder, manifest, [manifest.prompts], hashes=verify)
        self.bank = read_prompts(resolve_inside(self.folder, manifest.prompts))
        files = text_tower_files(self.folder, manifest, self.bank, verify)
        try:
            self.tables = PromptTables.from_recipe(json.loads(files.recipe.read_text()))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{files.recipe} is not a valid text recipe ({exc}); export the text tower anew with "
                                f"`anoclip-export --text-tower --out {self.folder}`") from None
        self.tokenizer = Tokenizer(files.vocabulary, files.context_length)
        self.engine = "OpenVINO" if backend == "openvino" else f"onnxruntime {backend}"
        self._run = _openvino_runner(files.model, threads) if backend == "openvino" else \
            _onnxruntime_runner(files.model, backend, threads)

    def encode(self, sentences: list[str], progress=None) -> np.ndarray:
        """Raw text embeddings [N, D] (float64) of ``sentences``."""
        parts = []
        for start in range(0, len(sentences), BATCH):
            chunk = sentences[start:start + BATCH]
            parts.append(self._run(self.tokenizer(chunk)))
            if progress is not None:
                progress.update(len(chunk))
        return np.concatenate(parts).astype(np.float64)

    def class_prompts(self, name: str, domain=None, phrase: str | None = None, defect_types=()) -> ClassPrompts:
        """``name``'s baked prompts (and its defect types' embeddings), encoded here from the recipe's sentences."""
        from tqdm import tqdm

        recipe = PromptRecipe.for_class(name, domain, phrase, tables=self.tables, defect_types=defect_types)
        normal, abnormal = recipe.sentences(self.tables)
        typed = recipe.type_sentences(self.tables)
        self.check_sentences(recipe.phrase, normal + abnormal + [t for group in typed for t in group])
        with tqdm(total=len(normal) + len(abnormal) + sum(map(len, typed)), desc=f"prompts {name}", unit="sent",
                  file=sys.stderr, disable=None) as bar:
            raw_normal, raw_abnormal = self.encode(normal, bar), self.encode(abnormal, bar)
            raw_types = [self.encode(sentences, bar) for sentences in typed]
        text, prompts = class_embeddings(raw_normal, raw_abnormal)
        meta = recipe.as_metadata(self.tables)
        meta["sentences_per_state"] = len(normal)
        meta["encoded_by"] = f"anoclip classes add ({self.engine})"
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return ClassPrompts(name, text, prompts, meta, recipe.defect_types,
                            type_embeddings(raw_types) if raw_types else None)


    def check_sentences(self, phrase: str, sentences: list[str]) -> None:
        """A ValueError when the phrase tokenizes to nothing or a sentence would be cut at the context
        length (the export would encode a different sentence than the recipe says)."""
        if not self.tokenizer.encode(phrase):
            raise ValueError(f"{phrase!r} tokenizes to nothing (only characters the tokenizer drops); give a name "
                             "or --phrase with letters or digits")
        room = self.tokenizer.context_length - 2  # the start and end ids
        longest = max(sentences, key=lambda text: len(self.tokenizer.encode(text)))
        if len(self.tokenizer.encode(longest)) > room:
            raise ValueError(f"the sentence {longest!r} takes {len(self.tokenizer.encode(longest))} tokens, more than "
                             f"the text model's {room}: it would be cut; give a shorter --phrase")


def with_class(bank: PromptBank, prompts: ClassPrompts | None, remove: str | None = None) -> PromptBank:
    """A copy of ``bank`` with ``prompts`` added or replaced, or the class ``remove`` taken out."""
    classes = {n: c for n, c in bank.classes.items() if n != remove}
    if prompts is not None:
        classes[prompts.name] = prompts
    return PromptBank(dict(sorted(classes.items())), bank.backbone, bank.pretrained, bank.embed_dim, dict(bank.metadata))


def _onnxruntime_runner(model: Path, backend: str, threads: int | None):
    """token ids -> text embeddings through onnxruntime with ``backend``'s execution provider (CPU behind it)."""
    import onnxruntime as ort

    from .backends.onnxruntime import resolve_providers

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    requested = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}.get(backend, backend)
    try:
        session = ort.InferenceSession(str(model), sess_options=options,
                                       providers=resolve_providers([requested], ort.get_available_providers()))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise AnoclipError(f"onnxruntime cannot load {model}: {str(exc).splitlines()[0]}") from None
    return lambda tokens: session.run(None, {"token_ids": tokens})[0]


def _openvino_runner(model: Path, threads: int | None):
    """token ids -> text embeddings through OpenVINO on the CPU, in float32."""
    from .backends.openvino import import_openvino

    ov = import_openvino()
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        compiled = ov.Core().compile_model(str(model), "CPU", config)
    except Exception as exc:  # openvino raises RuntimeError with multi-line messages
        raise AnoclipError(f"OpenVINO cannot load {model}: {str(exc).strip().splitlines()[0]}") from None
    output = compiled.outputs[0]
    return lambda tokens: np.asarray(compiled({0: tokens})[output], dtype=np.float32)
