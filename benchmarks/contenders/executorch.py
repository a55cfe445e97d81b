"""Benchmark contender: an ExecuTorch .pte through `executorch.runtime` method calls (the kernels the
runner uses, timed per call). The decoder is loaded as its own program: the Python runtime shares one
memory plan between the methods of a program."""

from __future__ import annotations


def prepare() -> None:
    from mobilevlm.export.executorch import load_runtime_kernels

    load_runtime_kernels()


class Contender:
    backend = "executorch"

    def __init__(self, bundle, artifact: dict):
        from executorch.runtime import Runtime

        from mobilevlm.errors import MobileVLMError

        inputs = [i["name"] for i in artifact["methods"]["text_decoder"]["inputs"]]
        if len(inputs) > 2:
            # The worker feeds the image as prompt embeddings (the token interface); a decoder with an
            # image input (cross_attention: image_features, visual_expert: image_mask) needs a
            # different prompt flow, which the benchmark does not have yet.
            raise MobileVLMError(
                f"{bundle.path(artifact['file'])}: text_decoder takes {', '.join(inputs)} "
                f"(interface {artifact['methods']['text_decoder'].get('interface', '?')!r}); the benchmark drives only token-interface programs"
            )
        path = bundle.path(artifact["file"])
        self.name, self.file_bytes = artifact["name"], path.stat().st_size
        runtime = Runtime.get()
        encoders = runtime.load_program(str(path))
        self.vision = encoders.load_method("vision_encoder")
        self.embedding = encoders.load_method("token_embedding")
        self.decoder = runtime.load_program(str(path)).load_method("text_decoder")  # own memory plan

    def encode(self, image_u8):
        return self.vision.execute([image_u8])[0]

    def embed(self, ids):
        return self.embedding.execute([ids])[0]

    def decode(self, embeds, pos):
        return self.decoder.execute([embeds, pos])[0][0]
