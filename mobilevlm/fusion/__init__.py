"""Expert-model fusion (the MLLM survey's third modality interface): a small scene expert turns the
image into text, and a text-only decoder answers from that text in its prompt.

- `expert.py`: `SceneExpert` (CNN with per-cell and per-row heads), `decode_scene`, `describe`,
  `train_expert`, `expert_accuracy`;
- `pipeline.py`: the decoder's fine-tuning on described scenes, `FusionAnswerer` (an `evaluate`
  answerer), `train_fusion` / `load_fusion`;
- `mobilevlm.export.fusion`: the pair as two ExecuTorch programs and a manifest, `FusionSession`.

Nothing is imported here: `mobilevlm.fusion.expert` alone stays free of the training package.
"""
