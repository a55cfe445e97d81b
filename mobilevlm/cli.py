"""The `mobilevlm` command: one console script with a subcommand per job.

Errors caused by input (`MobileVLMError`) are printed as one line and exit with status 2; `--debug`
shows the traceback instead. Subcommands import their heavy dependencies only when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import MobileVLMError

# name -> class with `add_arguments(parser)` and `run(args) -> exit status`; its docstring is the help.
COMMANDS: dict[str, type] = {}


def command(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        COMMANDS[name] = cls
        return cls

    return register


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, bundles: bool = False) -> None:
    parser.add_argument("--model", type=Path, help="checkpoint folder (ours, or a published MobileVLM / LLaVA folder); default: the shipped reference model")
    parser.add_argument("--vision-tower", type=Path, help="separate CLIP folder for checkpoints that do not embed the vision weights")
    parser.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weight files (read with weights_only)")
    if bundles:
        parser.add_argument("--bundle", type=Path, help="run an exported artifact of this bundle instead of the PyTorch model")
        parser.add_argument("--artifact", help="artifact name in the bundle (default: its first)")
        parser.add_argument("--fusion", type=Path, help="a `mobilevlm fusion train` folder (scene expert + text-only decoder) instead of --model")


def answerer_from_args(args: argparse.Namespace):
    """The PyTorch reference (--model), an exported artifact in its runtime (--bundle), or the
    expert-fusion pipeline (--fusion: a trained folder, or --bundle of a fusion bundle)."""
    if getattr(args, "fusion", None):
        if args.model or args.bundle:
            raise MobileVLMError("give one of --model, --bundle and --fusion")
        from .fusion.pipeline import load_fusion

        return load_fusion(args.fusion)
    if getattr(args, "bundle", None):
        if args.model:
            raise MobileVLMError("give --model or --bundle, not both")
        from .export.fusion import is_fusion_bundle

        if is_fusion_bundle(args.bundle):
            from .export.fusion import FusionSession

            return FusionSession(args.bundle, args.artifact)
        from .export.pipeline import open_session

        return open_session(args.bundle, args.artifact)[0]
    from .checkpoint import load_model, load_processor
    from .evaluate import ReferenceAnswerer

    model_dir = args.model or default_model_dir()
    return ReferenceAnswerer(load_model(model_dir, args.vision_tower, args.allow_pickle), load_processor(model_dir, args.vision_tower))


def default_model_dir() -> Path:
    from .export.pipeline import default_model_dir as shipped

    return shipped()


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@command("generate")
class Generate:
    """Answer a question about an image with the PyTorch reference model."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser, bundles=True)
        parser.add_argument("--image", type=Path, required=True)
        parser.add_argument("--prompt", required=True)
        parser.add_argument("--max-new-tokens", type=positive_int, default=64)
        parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        parser.add_argument("--top-p", type=float, default=1.0)
        parser.add_argument("--seed", type=int, help="sampling seed (sampled answers repeat with the same seed)")
        parser.add_argument("--threads", type=positive_int, help="torch CPU threads")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .generate import generate_stream
        from .processing import check_prompt, load_image

        set_threads(args.threads)
        if not 0 < args.top_p <= 1 or args.temperature < 0:
            raise MobileVLMError(f"--top-p must be in (0, 1] and --temperature >= 0 (got {args.top_p}, {args.temperature})")
        prompt = check_prompt(args.prompt)
        image = load_image(args.image)
        answerer = answerer_from_args(args)
        if args.bundle or args.fusion:
            if args.temperature > 0:
                raise MobileVLMError("--bundle and --fusion run greedy decoding only (--temperature 0)")
            print(answerer.answer(image, prompt, args.max_new_tokens))
            return 0
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        for piece in generate_stream(answerer.model, answerer.processor, image, prompt, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0


@command("init")
class Init:
    """Write a checkpoint with random weights in a preset's shape (for benchmarks of published shapes)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from .config import PRESETS

        parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--force", action="store_true", help="replace --out if it exists")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import tempfile

        import torch

        from .checkpoint import save_pretrained
        from .config import get_preset
        from .data.tokenizer import build_tokenizer, pad_vocabulary
        from .model import MobileVLM
        from .processing import get_template

        config = get_preset(args.preset)
        torch.manual_seed(args.seed)
        model = MobileVLM(config)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = Path(tmp) / "tokenizer.json"
            built = build_tokenizer(get_template(config.prompt_template).text, min(config.text.vocab_size, 1024))
            pad_vocabulary(built, config.text.vocab_size).save(str(tokenizer))
            save_pretrained(model, args.out, tokenizer=tokenizer, overwrite=args.force)
        print(f"wrote {args.out} ({model.num_parameters():,} parameters, random weights, preset {args.preset})")
        return 0


@command("scene")
class Scene:
    """Render a synthetic scene of a split and print its caption and questions (for trying models)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--split", choices=("train", "val", "test"), default="test")
        parser.add_argument("--index", type=int, default=0, help="scene number within the split")
        parser.add_argument("--size", type=positive_int, default=256)
        parser.add_argument("--out", type=Path, required=True, help="PNG file to write")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .data import caption, instruction_qas, make_scene, render_scene, scene_seeds
        from .data.splits import text_rng
        from .fileio import atomic_file

        try:
            seed = next(scene_seeds(args.split, args.index, 1))
        except ValueError as exc:
            raise MobileVLMError(f"--index: {exc}") from None
        scene = make_scene(seed)
        with atomic_file(args.out) as handle:
            render_scene(scene, args.size).save(handle, format="PNG")
        print(f"{args.out}: scene {seed} ({args.split} #{args.index})")
        print(f"caption: {caption(scene)}")
        for qa in instruction_qas(scene, text_rng(seed, "instruction")):
            print(f"{qa.qtype}: {qa.question} -> {qa.answer}")
        return 0


@command("train")
class Train:
    """Train a model from scratch on generated data, stage by stage (resumable; torchrun for several processes)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from .train.recipe import RECIPES, STAGES

        parser.add_argument("--out", type=Path, required=True, help="run folder (stages, logs, final model under OUT/model)")
        parser.add_argument("--recipe", default="tiny", choices=sorted(RECIPES))
        parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
        parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last complete checkpoint")
        parser.add_argument("--force", action="store_true", help="delete an existing run folder and start over")
        parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per process (1 measured fastest here)")
        parser.add_argument("--save-every", type=positive_int, default=100, help="steps between mid-stage checkpoints")
        parser.add_argument("--eval-scenes", type=int, default=0, help="afterwards, evaluate the instruct and dpo stages on this many test scenes (OUT/eval.json)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .train import Trainer, get_recipe

        set_threads(args.threads)
        recipe = get_recipe(args.recipe).select(args.stages.split(",") if args.stages else None)
        final = Trainer(args.out, recipe, resume=args.resume, force=args.force, save_every=args.save_every).run()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"final model: {final}")
            if args.eval_scenes:
                from .train.loop import evaluate_run

                evaluate_run(args.out, args.eval_scenes)
        return 0


@command("evaluate")
class Evaluate:
    """Closed-ended accuracy, POPE and CHAIR on held-out test scenes."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser, bundles=True)
        parser.add_argument("--seed", type=int, help="first test-split scene seed (values below the test range are offsets into it)")
        parser.add_argument("--num", type=positive_int, default=100, help="number of scenes")
        parser.add_argument("--json", type=Path, help="write the full result here")
        parser.add_argument("--threads", type=positive_int, default=1)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .evaluate import eval_seeds, evaluate, summary_lines
        from .fileio import write_json

        set_threads(args.threads)
        eval_seeds(args.seed, args.num)  # refuse a bad range before loading anything
        result = evaluate(answerer_from_args(args), args.seed, args.num)
        result["model"] = str(args.fusion or args.bundle or args.model or default_model_dir()) + (f" ({args.artifact})" if args.bundle and args.artifact else "")
        print("\n".join(summary_lines(result)))
        if args.json:
            write_json(args.json, result)
        return 0


@command("export")
class Export:
    """Quantize, lower and verify a model for a backend; write an app-ready bundle."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--backend", default="executorch", help="executorch, onnx, coreml, gguf or hf")
        parser.add_argument("--quant", default=None, help="recipe, or several separated by commas; default: the backend's exact one (executorch: fp32 | 8da8w | 8da4w[-gN][-emb8|-emb4|-embfp][-vis8]; "
                            "onnx: fp32, fp16, int8, int4[-bN]; coreml: fp16, int8[-bN], int4[-bN], palettize4[-gN]; gguf: f32, f16, q8_0, q4_0, q4_k_m)")
        parser.add_argument("--model", type=Path, help="checkpoint folder (default: the shipped reference model)")
        parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
        parser.add_argument("--force", action="store_true", help="replace --out if it exists")
        parser.add_argument("--context-length", type=positive_int, help="KV-cache positions (default: the model's context)")
        parser.add_argument("--parity-cases", type=int, default=8, help="image/question pairs compared with the reference")
        parser.add_argument("--eval-scenes", type=int, default=20, help="test scenes for task accuracy (0 to skip)")
        parser.add_argument("--eval-seed", type=int, help="first test scene (as in mobilevlm evaluate)")
        parser.add_argument("--threads", type=positive_int, help="torch / runtime CPU threads")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .export.pipeline import export_bundle

        set_threads(args.threads)
        from .export.pipeline import get_backend

        quant = args.quant or ",".join(get_backend(args.backend).exact_recipes or ("f32",))
        recipes = tuple(r.strip() for r in quant.split(",") if r.strip())
        export_bundle(args.out, args.backend, recipes, args.model, args.force, args.context_length, args.parity_cases, args.eval_scenes, args.eval_seed)
        return 0


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


@command("bench")
class Bench:
    """Measure every artifact of a bundle and the PyTorch reference: load, encode, prefill, TTFT, decode, memory."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("bundle", type=Path)
        parser.add_argument("--target", default="host", help="host, emulator (ARM64 under qemu-aarch64-static; emulated times) or adb (a connected Android device)")
        parser.add_argument("--runner", type=Path, help="adb target: a runner binary to push and run instead of the demo app's benchmark mode")
        parser.add_argument("--emulate", metavar="DEVICE", help="emulator target: emulate the CPU features of this device profile's big cores (default: QEMU_CPU or cortex-a76)")
        parser.add_argument("--threads", type=int_list, default=(1,), help="thread counts to measure, e.g. 1,2")
        parser.add_argument("--prompt-lengths", type=int_list, default=(16, 64), help="prefill lengths to time")
        parser.add_argument("--repeats", type=positive_int, default=5)
        parser.add_argument("--warmup", type=int, default=1)
        parser.add_argument("--decode-tokens", type=positive_int, default=32)
        parser.add_argument("--model", type=Path, help="reference checkpoint (default: the one the bundle was exported from)")
        parser.add_argument("--only", help="comma-separated contenders to run (pytorch or artifact names)")
        parser.add_argument("--peers", help="comma-separated peers built from the same checkpoint and measured in the same run: llama.cpp, ort-genai, executorch-llm (benchmarks/peers/)")
        parser.add_argument("--project", help="comma-separated devices to project the measured records onto (list: python -m mobilevlm.benchmarks.projection --devices)")
        parser.add_argument("--project-threads", type=int_list, default=(4,), help="thread counts for the projected records")
        parser.add_argument("--results", type=Path, default=Path("results.jsonl"), help="JSON records are appended here")
        parser.add_argument("--report", type=Path, help="also write the Markdown table here")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .benchmarks.report import markdown_table
        from .benchmarks.runner import append_records, run_bench
        from .fileio import atomic_file

        only = tuple(x.strip() for x in args.only.split(",")) if args.only else ()
        devices = [d.strip() for d in args.project.split(",") if d.strip()] if args.project else []
        if devices:  # a bad device name fails before the long run
            from .benchmarks.devices import get_device

            for device in devices:
                get_device(device)
        from .benchmarks.peers import parse_peers

        peers = parse_peers(args.peers)  # an unknown peer fails before the long run
        records = run_bench(args.bundle, args.target, args.threads, args.prompt_lengths, args.repeats, args.warmup, args.decode_tokens, args.model, only,
                            runner=args.runner, peers=peers, emulate=args.emulate)
        if devices:
            from .benchmarks.projection import project_records

            records += project_records(records, devices, args.project_threads)
        append_records(args.results, records)
        table = markdown_table(records)
        print(table)
        if args.report:
            with atomic_file(args.report, "w") as handle:
                handle.write(table)
        failed = [r["contender"] for r in records if "error" in r]
        if failed:
            raise MobileVLMError(f"benchmark failed for {', '.join(failed)}: " + "; ".join(r["error"] for r in records if "error" in r))
        return 0


@command("ablate")
class Ablate:
    """Train, evaluate, export and time each model-family variant with the same budget; one table."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from .benchmarks.ablate import add_arguments

        add_arguments(parser)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .benchmarks.ablate import run

        return run(args)


@command("fusion")
class Fusion:
    """Expert-model fusion: train a scene expert and a text-only decoder that reads its description, or export the pair to ExecuTorch."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("action", choices=("train", "export"))
        parser.add_argument("--out", type=Path, required=True, help="train: the run folder; export: the bundle folder")
        parser.add_argument("--run", type=Path, help="export: the folder `fusion train` wrote")
        parser.add_argument("--model", type=Path, help="train: the checkpoint whose decoder is fine-tuned (default: the shipped reference model)")
        parser.add_argument("--expert-steps", type=positive_int, default=300)
        parser.add_argument("--decoder-steps", type=positive_int, default=450)
        parser.add_argument("--quant", default="fp32", help="export: ExecuTorch recipe of the decoder program")
        parser.add_argument("--parity-cases", type=positive_int, default=4)
        parser.add_argument("--force", action="store_true", help="replace an existing output folder")
        parser.add_argument("--threads", type=positive_int, default=1)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        set_threads(args.threads)
        if args.action == "train":
            from .fusion.pipeline import train_fusion

            train_fusion(args.out, args.expert_steps, args.decoder_steps, model_dir=args.model, overwrite=args.force)
            return 0
        if not args.run:
            raise MobileVLMError("fusion export needs --run (the folder `mobilevlm fusion train` wrote)")
        from .export.fusion import export_fusion

        export_fusion(args.out, args.run, args.quant, args.parity_cases, force=args.force)
        return 0


@command("report")
class Report:
    """Markdown report and PNG charts from a results.jsonl (measured, emulated and projected records)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("results", type=Path)
        parser.add_argument("--out", type=Path, help="output folder (default: RESULTS-report beside the results file)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .benchmarks.report import report_main

        for path in report_main(args.results, args.out):
            print(path)
        return 0


class OneLineParser(argparse.ArgumentParser):
    """Usage errors follow the rule for every bad input: one `error:` line, status 2 (argparse's
    default prints the whole usage block first, which buries the line that matters)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mobilevlm", description="MobileVLM-style models from PyTorch to phones.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cls in COMMANDS.items():
        p = sub.add_parser(name, help=cls.__doc__, description=cls.__doc__)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        cls.add_arguments(p)
        p.set_defaults(run=cls.run)
    return parser


def quiet_libraries() -> None:
    """Keep library chatter off the terminal: torchao's optional-kernel notices, torch's deprecation
    warnings during export. `--debug` leaves them on."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "torch._export", "torch.export", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(Mutation on a buffer|is newer than|TracerWarning|Converting a tensor).*")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_libraries()
    try:
        return args.run(args)
    except MobileVLMError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
