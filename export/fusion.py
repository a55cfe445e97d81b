"""Expert-model fusion to ExecuTorch: two programs and a manifest that says how to join them.

    BUNDLE/scene_expert.pte       method `scene_expert(image uint8 [1, 3, S, S]) -> head logits`
    BUNDLE/decoder-<recipe>.pte   methods `token_embedding`, `text_decoder` (+ the runner's constant methods)
    BUNDLE/manifest.json          preprocessing, head vocabularies, the describe rule as data, the prompt, parity
    BUNDLE/tokenizer.json, tokenizer_config.json, parity/case-NN.png

An app runs the expert on the image, turns its logits into the description with `manifest.describe`
(class names, templates and the decoding rule are all data there), fills the description and the
question into `manifest.prompt.text`, and decodes greedily with the decoder program, which is a
text-only program of the same kind the main exporter writes (same method classes, same kernels).
`FusionSession` does exactly that through `executorch.runtime`, reading only the bundle; export fails,
leaving nothing, unless its fp32 answers equal the PyTorch `FusionAnswerer`'s on every parity case.

The format is its own ("mobilevlm-fusion-bundle"): readers of single-program bundles refuse it instead
of looking for a `vision_encoder` method that is not there.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from PIL import Image
from torch import nn

from mobilevlm.checkpoint import load_model, load_processor
from mobilevlm.data.scene import CELL_PHRASES, GRID, ROW_NAMES
from mobilevlm.errors import BundleError, ExportError, PromptError
from mobilevlm.fileio import OutputError, atomic_folder, read_json
from mobilevlm.fusion.expert import COLOR_CLASSES, HEADS, SHAPE_CLASSES, SIZE_CLASSES, SceneExpert, load_expert
from mobilevlm.fusion.pipeline import DESCRIPTION_SLOT, FusionAnswerer
from mobilevlm.model import MobileVLM
from mobilevlm.processing import Processor

from .bundle import MANIFEST, check_files, finalize_manifest, git_commit, preprocessing_spec, versions, write_tokenizer
from .executorch import TextDecoderMethod, TokenEmbeddingMethod, load_runtime_kernels, method_specs, quantized_copy
from .parity import captured_native_output, native_error, parity_cases
from .quantize import QuantRecipe, parse_recipe

FORMAT = "mobilevlm-fusion-bundle"
FORMAT_VERSION = 1
EXPERT_FILE = "scene_expert.pte"
RUNTIME = "executorch.runtime (Python) / ExecuTorch Module API, XNNPACK"


class SceneExpertMethod(nn.Module):
    """uint8 RGB [1, 3, S, S] -> the expert's head logits; normalisation inside (as `vision_encoder`)."""

    def __init__(self, expert: SceneExpert):
        super().__init__()
        self.expert = expert
        c = expert.config
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(c.image_std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(c.image_mean) / torch.tensor(c.image_std)).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.expert(image.to(torch.float32) * self.scale - self.shift)


# --- the manifest's data: heads and the describe rule -------------------------------------------------


def heads_spec(expert: SceneExpert) -> dict:
    """Each output of `scene_expert`: its index, shape and class names."""
    classes = {"shape": SHAPE_CLASSES, "color": COLOR_CLASSES, "size": SIZE_CLASSES, "word": expert.config.word_classes}
    per = {"shape": "cell", "color": "cell", "size": "cell", "word": "row"}
    return {name: {"output": i, "per": per[name], "shape": [1, GRID * GRID if per[name] == "cell" else GRID, len(classes[name])], "classes": list(classes[name])}
            for i, name in enumerate(HEADS)}


def describe_spec() -> dict:
    """`mobilevlm.fusion.expert.decode_scene` + `describe` as data (an app's whole rule)."""
    return {
        "grid": GRID,
        "cells": "cell i of a per-cell head is row i // grid, column i % grid (row 0 at the top, column 0 on the left)",
        "argmax": "index of the largest logit; the first such index on ties",
        "word_rule": "per row r: margin[r] = max(word[r][1:]) - word[r][0]; w = the first row with the largest margin; "
        "if margin[w] > 0 the image has the word word.classes[1 + argmax(word[w][1:])] in row w, otherwise no word",
        "object_rule": "cell i holds an object when shape.classes[argmax(shape[i])] is not 'empty' and its row is not the word's row; "
        "its shape, color and size are the class names of the argmax of shape[i], color[i], size[i]",
        "object_phrase": "{article} {size} {color} {shape} {cell_phrase}",
        "article": {"an_before": "aeiou", "rule": "'an' if the phrase after the article starts with one of an_before, else 'a'"},
        "cell_phrases": [list(row) for row in CELL_PHRASES],
        "word_phrase": "the word {word} across the {row_name}",
        "row_names": list(ROW_NAMES),
        "order": "object phrases in cell order, then the word phrase",
        "join": {"one": "{0}", "two": "{0} and {1}", "more": "all but the last joined by ', ', then ', and ' and the last"},
        "nothing": "nothing but the background",
        "sentence": "upper-case the first character and append '.'",
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # max keeps the first of equal items


def description_from_logits(heads: dict, rule: dict, outputs: list) -> str:
    """The description from the expert's outputs [shape, color, size, word] (nested lists or tensors of
    one image), following only the manifest's `heads` and `describe` data, as an app would."""
    out = {name: (outputs[spec["output"]].tolist() if hasattr(outputs[spec["output"]], "tolist") else outputs[spec["output"]])[0] for name, spec in heads.items()}
    grid = rule["grid"]
    margins = [max(row[1:]) - row[0] for row in out["word"]]
    word_row = _argmax(margins)
    has_word = margins[word_row] > 0
    parts = []
    for i, logits in enumerate(out["shape"]):
        row, col = divmod(i, grid)
        shape = heads["shape"]["classes"][_argmax(logits)]
        if shape == "empty" or (has_word and row == word_row):
            continue
        size, color = heads["size"]["classes"][_argmax(out["size"][i])], heads["color"]["classes"][_argmax(out["color"][i])]
        article = "an" if size[:1] in rule["article"]["an_before"] else "a"  # the phrase after the article starts with the size
        parts.append(rule["object_phrase"].format(article=article, size=size, color=color, shape=shape, cell_phrase=rule["cell_phrases"][row][col]))
    if has_word:
        word = heads["word"]["classes"][1 + _argmax(out["word"][word_row][1:])]
        parts.append(rule["word_phrase"].format(word=word, row_name=rule["row_names"][word_row]))
    join = rule["join"]
    body = rule["nothing"] if not parts else join["one" if len(parts) == 1 else "two"].format(*parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + ", and " + parts[-1]
    return body[0].upper() + body[1:] + "."


def prompt_spec(processor: Processor, context_length: int) -> dict:
    tok, template = processor.tokenizer, processor.template
    return {
        "template": template.name, "text": template.text.replace("<image>", DESCRIPTION_SLOT), "description_slot": DESCRIPTION_SLOT, "prompt_slot": "{prompt}",
        "add_bos": template.add_bos, "bos_id": tok.bos_id, "eos_ids": [tok.eos_id], "pad_id": tok.pad_id, "stop_strings": list(template.stop),
        "context_length": context_length,
        "how_to_run": "replace description_slot with the description and prompt_slot with the question, tokenize the whole text "
        "(BOS first if add_bos), run token_embedding on all ids and text_decoder at positions 0..T-1, then greedy-decode one token at a time "
        "until an EOS id, max_new_tokens or context_length",
    }


# --- lowering -------------------------------------------------------------------------------------------


def _lower(programs: dict, partitioners: dict, metadata: dict, path: Path) -> None:
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    edge = to_edge_transform_and_lower(programs, partitioner=partitioners, constant_methods=metadata or None, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            passes=[QuantFusionPass()],
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),  # plan for the largest dynamic shape
        )
    )
    with open(path, "wb") as handle:
        program.write_to_file(handle)


def export_expert(expert: SceneExpert, path: Path) -> dict:
    """The expert as a one-method .pte (fp32, XNNPACK); returns the method's spec."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    method = SceneExpertMethod(copy.deepcopy(expert).eval().float()).eval()
    s = expert.config.image_size
    with torch.no_grad():
        program = torch.export.export(method, (torch.zeros(1, 3, s, s, dtype=torch.uint8),), strict=False)
    _lower({"scene_expert": program}, {"scene_expert": [XnnpackPartitioner()]}, {"get_image_size": s}, path)
    image = {"name": "image", "dtype": "uint8", "shape": [1, 3, s, s], "layout": "NCHW", "channels": "RGB", "range": [0, 255], "resized_inside": False, "normalized_inside": True}
    outputs = [{"name": f"{name}_logits", "dtype": "float32", "shape": spec["shape"]} for name, spec in heads_spec(expert).items()]
    return {"scene_expert": {"inputs": [image], "outputs": outputs}}


def export_decoder(model: MobileVLM, processor: Processor, recipe: QuantRecipe, path: Path, cache_len: int) -> tuple[dict, dict]:
    """`token_embedding` and `text_decoder` of `model` (the main exporter's method classes and kernels)
    as a .pte; returns (method specs, constant-method metadata)."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from torch.export import Dim

    if model.config.interface != "token":
        raise ExportError(f"expert fusion feeds the decoder text only; a decoder with the {model.config.interface!r} interface needs an image input (use a token-interface checkpoint)")
    if not 2 <= cache_len <= model.config.text.max_seq_len:
        raise ExportError(f"context length {cache_len} must be in 2..{model.config.text.max_seq_len} (the decoder's context)")
    load_runtime_kernels()
    model = quantized_copy(model, recipe, vision=False)  # the text-only decoder's image path is never lowered
    embedding, decoder = TokenEmbeddingMethod(model), TextDecoderMethod(model, cache_len)
    seq = Dim("seq", min=1, max=cache_len - 1)
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        programs = {
            "token_embedding": torch.export.export(embedding, (torch.zeros(1, 4, dtype=torch.long),), dynamic_shapes=({1: Dim("tokens", min=1, max=cache_len)},), strict=False),
            "text_decoder": torch.export.export(decoder, (torch.zeros(1, 4, model.config.text.hidden_size), torch.arange(4)), dynamic_shapes=({1: seq}, {0: seq}), strict=False),
        }
    metadata = {
        "get_max_seq_len": cache_len, "get_max_context_len": cache_len, "get_eos_ids": [processor.tokenizer.eos_id], "get_bos_id": processor.tokenizer.bos_id,
        "get_vocab_size": model.config.text.vocab_size, "get_n_layers": model.config.text.num_layers, "use_kv_cache": True, "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": True,
    }
    partitioners = {"token_embedding": [], "text_decoder": [XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True), XnnpackPartitioner()]}
    _lower(programs, partitioners, metadata, path)
    specs = method_specs(model, cache_len, recipe)
    return {k: specs[k] for k in ("token_embedding", "text_decoder")}, metadata


# --- the runtime side -----------------------------------------------------------------------------------


def is_fusion_bundle(root: str | Path) -> bool:
    """Whether `root` holds a fusion bundle (anything unreadable is left to the regular bundle reader's errors)."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_fusion_bundle(root: str | Path, verify: bool = True) -> dict:
    """The manifest of a fusion bundle, its format and every file's checksum checked."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing (not a bundle written by export_fusion)")
    manifest = read_json(path, BundleError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
        raise BundleError(f"{path}: fields 'format' / 'format_version' must be {FORMAT!r} / at most {FORMAT_VERSION}")
    missing = [f for f in ("preprocessing", "heads", "describe", "prompt", "tokenizer", "artifacts", "files") if f not in manifest]
    if missing:
        raise BundleError(f"{path}: missing field(s) {', '.join(missing)}")
    check_files(root, manifest["files"], verify)
    unlisted = [a.get("name") for a in manifest["artifacts"] if a.get("file") not in manifest["files"]]
    if unlisted:
        raise BundleError(f"{path}: artifact(s) {unlisted} name files not listed under 'files'")
    return manifest


class FusionSession:
    """Both programs of a fusion bundle in `executorch.runtime`, driven from the manifest alone."""

    def __init__(self, root: str | Path, decoder: str | None = None):
        from mobilevlm.processing import ImageProcessor, Tokenizer

        self.root = Path(root)
        self.manifest = load_fusion_bundle(self.root)
        experts = [a for a in self.manifest["artifacts"] if a.get("role") == "expert"]
        decoders = [a for a in self.manifest["artifacts"] if a.get("role") == "decoder" and (decoder is None or a["name"] == decoder)]
        if not experts or not decoders:
            raise BundleError(f"{self.root / MANIFEST}: needs an expert artifact and a decoder artifact{f' named {decoder!r}' if decoder else ''}")
        self.prompt, self.heads, self.rule = self.manifest["prompt"], self.manifest["heads"], self.manifest["describe"]
        self.image_processor = ImageProcessor.from_spec(self.manifest["preprocessing"])
        self.tokenizer = Tokenizer(self.root / self.manifest["tokenizer"]["file"])
        with captured_native_output() as output:
            load_runtime_kernels()
            from executorch.runtime import Runtime

            runtime = Runtime.get()
            try:
                self.expert = runtime.load_program(str(self.root / experts[0]["file"])).load_method("scene_expert")
                path = str(self.root / decoders[0]["file"])
                self.embedding = runtime.load_program(path).load_method("token_embedding")
                # its own program: methods of one program share a memory plan, which would let the
                # embedding method overwrite the decoder's KV cache
                self.decoder = runtime.load_program(path).load_method("text_decoder")
            except RuntimeError:
                raise native_error(f"{self.root}: ExecuTorch cannot load the fusion programs", output) from None

    def expert_outputs(self, image: Image.Image) -> list[torch.Tensor]:
        pixels = self.image_processor.prepare_views(image).contiguous()
        return [t.clone() for t in self.expert.execute([pixels])]

    def describe_image(self, image: Image.Image) -> str:
        return description_from_logits(self.heads, self.rule, self.expert_outputs(image))

    def prompt_ids(self, description: str, question: str) -> list[int]:
        from mobilevlm.processing import check_prompt

        head, rest = self.prompt["text"].split(self.prompt["description_slot"], 1)
        text = head + description + rest.replace(self.prompt["prompt_slot"], check_prompt(question))
        ids = self.tokenizer.encode(text, add_bos=self.prompt["add_bos"])
        if len(ids) >= self.prompt["context_length"]:
            raise PromptError(f"prompt takes {len(ids)} tokens with the description; {self.root.name} was exported with a context of {self.prompt['context_length']}")
        return ids

    def generate(self, image: Image.Image, prompt: str, max_new_tokens: int) -> tuple[list[int], str, torch.Tensor]:
        """Greedy (token ids, text, first-token logits [V]), stopping as the reference does."""
        ids = self.prompt_ids(self.describe_image(image), prompt)
        embeds = self.embedding.execute([torch.tensor([ids])])[0]
        logits = self.decoder.execute([embeds, torch.arange(len(ids))])[0][0].clone()
        first, pos, tokens = logits, len(ids), []
        budget = min(max_new_tokens, self.prompt["context_length"] - len(ids))
        eos = set(self.prompt["eos_ids"])
        while len(tokens) < budget:
            token = int(logits.argmax())
            if token in eos:
                break
            tokens.append(token)
            if len(tokens) < budget:
                step = self.embedding.execute([torch.tensor([[token]])])[0]
                logits = self.decoder.execute([step, torch.tensor([pos])])[0][0].clone()
                pos += 1
        return tokens, self.tokenizer.decode(tokens), first

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        return self.generate(image, prompt, max_new_tokens)[1]


# --- the export -------------------------------------------------------------------------------------------


def measure_parity(session: FusionSession, answerer: FusionAnswerer, cases: list) -> dict:
    """Descriptions, answers, expert logits and first-token logits of the runtime against PyTorch."""
    rows, errors, expert_errors = [], [], []
    for case in cases:
        image = case.image()
        ref = answerer.generate(image, case.question, case.max_new_tokens)
        tokens, text, first = session.generate(image, case.question, case.max_new_tokens)
        pixels = answerer.image_processor.preprocess(image)
        with torch.no_grad():
            expected = answerer.expert(pixels)
        got = session.expert_outputs(image)
        expert_errors.append(max(float((a - b).abs().max()) for a, b in zip(expected, got)))
        errors.append(float((first.float() - ref.first_logits.float()).abs().max()))
        description, reference_description = session.describe_image(image), answerer.describe_image(image)
        rows.append({"case": case.id, "description": description, "description_match": description == reference_description,
                     "reference": ref.text, "artifact": text, "match": text == ref.text and tokens == ref.token_ids})
    return {"results": rows, "num_cases": len(rows), "answers_identical": sum(r["match"] for r in rows),
            "descriptions_identical": sum(r["description_match"] for r in rows),
            "expert_logit_max_abs_error": max(expert_errors, default=0.0), "first_logit_max_abs_error": max(errors, default=0.0)}


def export_fusion(out: str | Path, run_dir: str | Path, recipe: str = "fp32", num_parity_cases: int = 4, context_length: int | None = None,
                  force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Export a `train_fusion` folder (OUT/expert + OUT/decoder) as a fusion bundle at `out`."""
    out, run_dir = Path(out), Path(run_dir)
    parsed = parse_recipe(recipe)
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (pass force=True to replace it)")
    expert, model, processor = load_expert(run_dir / "expert"), load_model(run_dir / "decoder"), load_processor(run_dir / "decoder")
    if processor.tokenizer.vocab_size != model.config.text.vocab_size:
        raise ExportError(f"{run_dir / 'decoder'}: tokenizer has {processor.tokenizer.vocab_size} tokens, the model outputs {model.config.text.vocab_size}; they must agree")
    context = context_length or model.config.text.max_seq_len
    answerer = FusionAnswerer(expert, model, processor)
    cases = parity_cases(num_parity_cases)
    training = json.loads((run_dir / "expert" / "config.json").read_text()).get("training")
    with atomic_folder(out, overwrite=force) as tmp:
        write_tokenizer(tmp, processor)
        (tmp / "parity").mkdir()
        for case in cases:
            case.image().save(tmp / "parity" / f"{case.id}.png")

        def artifact(name: str, role: str, file: str, quantization: dict, started: float, methods: dict, **extra) -> dict:
            return {"name": name, "role": role, "backend": "executorch", "file": file, "runtime": RUNTIME, "quantization": quantization,
                    "size_bytes": (tmp / file).stat().st_size, "export_seconds": round(time.time() - started, 1), "methods": methods, **extra}

        started, decoder_file = time.time(), f"decoder-{parsed.name}.pte"
        log(f"exporting the scene expert from {run_dir / 'expert'} ...")
        expert_artifact = artifact("scene-expert", "expert", EXPERT_FILE, {"recipe": "fp32"}, started, export_expert(expert, tmp / EXPERT_FILE))
        started = time.time()
        log(f"exporting the decoder ({parsed.name}) from {run_dir / 'decoder'} ...")
        methods, metadata = export_decoder(model, processor, parsed, tmp / decoder_file, context)
        decoder_artifact = artifact(f"decoder-{parsed.name}", "decoder", decoder_file, parsed.describe(), started, methods, metadata=metadata)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "toolkit": {"git_commit": git_commit(), "versions": versions()},
            "interface": "expert_fusion",
            "how_to_run": "run scene_expert on the image (preprocessing), turn its outputs into the description (heads + describe), "
            "then answer with the decoder program (prompt.how_to_run)",
            "source": str(run_dir),
            "expert": {"config": expert.config.to_dict(), "parameters": sum(p.numel() for p in expert.parameters()), "training": training},
            "model": {"source": str(run_dir / "decoder"), "parameters": sum(p.numel() for p in model.text.parameters()), "config": model.config.to_dict()},
            "preprocessing": preprocessing_spec(SimpleNamespace(image=expert.config.image_processor())),
            "heads": heads_spec(expert),
            "describe": describe_spec(),
            "prompt": prompt_spec(processor, context),
            "tokenizer": {"file": "tokenizer.json", "config_file": "tokenizer_config.json", "vocab_size": processor.tokenizer.vocab_size},
            "artifacts": [expert_artifact, decoder_artifact],
            "parity": {"recipe": parsed.name, "cases": [{"id": c.id, "image": f"parity/{c.id}.png", "question": c.question, "max_new_tokens": c.max_new_tokens, "scene_seed": c.seed} for c in cases]},
        }
        finalize_manifest(tmp, manifest)  # checksums first: the session reads the bundle as an app would
        log("checking parity in the runtime ...")
        parity = measure_parity(FusionSession(tmp), answerer, cases)
        manifest["parity"].update(parity)
        log(f"fusion {parsed.name}: {parity['answers_identical']}/{parity['num_cases']} answers and {parity['descriptions_identical']} descriptions identical; "
            f"expert logit error {parity['expert_logit_max_abs_error']:.2e}, first-token logit error {parity['first_logit_max_abs_error']:.2e}")
        bad = [r for r in parity["results"] if not (r["match"] and r["description_match"])]
        if parsed.name == "fp32" and bad:
            raise ExportError(f"fusion fp32 parity is broken on {bad[0]['case']}: reference {bad[0]['reference']!r}, artifact {bad[0]['artifact']!r} "
                              f"(description {bad[0]['description']!r}); no bundle written")
        finalize_manifest(tmp, manifest)
    log(f"wrote {out}")
    return out
