"""One command that proves the GPU path and measures every speed goal of BENCHMARKS.md.

    python -m epsdist.gpucheck --json runs/gpu-check.json     # or: make gpu-check (one GPU)
    python -m epsdist.gpucheck --smoke                          # tiny sizes, CPU, < 1 minute

No data and no weights: random inputs and a random-initialised ResNet-38 EPS model at the real
sizes. Sections, in order, under one time budget (``--budget-s``, default 300 s; an item that
would start past it is skipped and listed):

1. ``correctness`` -- on the device, compiled: the fused EPS loss (loss + gradient) against the
   float64 reference on the benchmark shapes, fp32 / bf16 / fp16 logits, contiguous and
   channels_last (tolerances of tests/test_eps_loss.py); the fused CAM post-processing against
   its float64 reference on VOC / COCO-sized views, contiguous and channels_last slices
   (tests/test_cam_post.py); a stage-1 run of ResNet-38-EPS at 448 px,
   batch 8, ``--steps`` (20) steps with the fused loss and the same steps from the same weights,
   batches and dropout seed with the reference loss, in fp32 and in bf16 + channels_last: the
   loss sequences must agree (``correctness.RUN_FIRST_TOL`` on the first step,
   ``RUN_SEQ_TOL`` over all).
2. ``loss`` -- the EPS loss fwd+bwd of ``voc_b8_56``, ``coco_b16_41``, ``coco_b64_56`` (fp32)
   and of the training layout (bf16 channels_last logits), fused vs eager reference (vs
   ``torch.compile`` of it, in section 5), with the bytes floor at the card's copy bandwidth
   (``epsdist_kernels.bench``'s ideal-bytes model and timing).
3. ``train`` -- one stage-1 training step (fused loss, SGD with the four parameter groups) of
   ResNet-38-EPS at VOC size (B=8, 448²) and COCO size (B=16, 321²) in img/s: fp32, bf16,
   bf16 + channels_last.
4. ``masks`` -- the pseudo-mask step per VOC-sized (375x500) and COCO-sized (480x640) image
   through infer.py's own function (``epsdist.infer_pipeline.group_masks``): 4 scales x 2
   flips, one forward per scale, then ``cam_to_mask``; one image per forward
   (``infer.batch_images=1``) and infer.py's default (4 images per forward, 3 at COCO size,
   where ``infer.max_side ** 2`` pixels cap a group); and the CPU's JPEG decode / PNG encode
   per image (infer.py overlaps them with the network).
5. ``compile`` -- every ``torch.compile`` row, last because compiling takes long: the
   ``train.compile`` step rows (bf16 + channels_last + torch.compile), the ``infer.compile``
   pseudo-mask rows (ResNet-38: ~1 minute each), then the loss reference compiled (with
   ``loss``).

Then a verdict against the goals (``report``) and a markdown table for BENCHMARKS.md. Exit
status 1 when a correctness check fails or any item raises (recorded, the run goes on); speed
goals missed are reported, not failures; 2 for a usage error (full sizes without CUDA).

``--smoke`` runs the same code at tiny sizes (tiny backbone, small inputs) so it cannot rot: on
a CPU the kernels run in Triton's interpreter and ``torch.compile`` uses its 'eager' backend.
Modules: ``workload`` (sizes, inputs, model, one training step), ``correctness``, ``speed``,
``report``, ``cli``.
"""
from .cli import main

__all__ = ["main"]
