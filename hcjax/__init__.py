"""hcjax: HunyuanCustom in JAX/Flax.

Layering (enforced by ``tests/test_layering.py``): a module may import only modules on its own floor or below,
never one above, and the module graph has no cycle. Imports sit at module top; only optional heavy libraries
(torch, transformers' PyTorch models, diffusers, av, cv2, gradio, onnxruntime, ...) may be imported inside a
function. Floors, bottom up:

0. ground          ``hcjax.config`` (model + run configs, YAML, ``apply_overrides``), ``hcjax.axes`` (mesh axes,
                   logical rule sets, fit helpers; pure), ``hcjax.cli`` (one-line errors for every entry point)
1. building blocks ``hcjax.layers``, ``hcjax.attention``, ``hcjax.rope``, ``hcjax.scheduler``, ``hcjax.media``
                   (images, video, audio), ``hcjax.sharding`` (meshes, param shardings), ``hcjax.checkpoint``,
                   ``hcjax.runtime`` (compilation cache)
2. models          ``hcjax.dit`` (incl. the AudioNet adapters and bg_in: DiT parameters), ``hcjax.vae``,
                   ``hcjax.conditioning`` (LLaMA, CLIP, LLaVA, Whisper, text encoding, editing inputs)
3. run             ``hcjax.pipeline``, ``hcjax.batching`` (several samples in one loop over the mesh's data axis),
                   ``hcjax.training``, ``hcjax.vae_training``, ``hcjax.lora``, ``hcjax.memory``
                   (memory estimates before allocating), ``hcjax.data``
                   (incl. ``data.encode``: latents + text states for training); ``convert_weights`` (strict tables;
                   imports models only for abstract shapes)
4. loading         ``hcjax.models`` (the only importer of ``convert_weights``): ``load(source) -> Models``
5. entry points    ``sample.py``, ``train.py``, ``demo/``, ``python -m hcjax.precompute``,
                   ``convert_weights.__main__``, ``benchmarks/``, ``scripts/``
"""
