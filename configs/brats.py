"""MST-KDNet on BraTS 2024 GLI: the paper's defaults (SPEC.md sections 3-5).

Variants by argument: ``--config=configs/brats.py:VARIANT`` with VARIANT one of
``tiny`` (a CPU-sized model that compiles and steps in seconds), ``cube64`` (the full-width
model on 64^3 inputs), ``no_mstkd``, ``no_gsme``,
``no_slkd`` (the ablations of the paper's Table 4), ``plain`` (the student alone with no
distillation), or several joined by commas (``tiny,plain``).
Every field can be overridden on the command line: ``--config.train.epochs=10``.
"""

from ml_collections import config_dict


def base_config():
  """Every field the project reads, with the paper's defaults."""
  c = config_dict.ConfigDict()
  c.seed = 0
  # 'float32' or 'bfloat16' (parameters, optimiser states and loss reductions stay float32).
  c.dtype = 'float32'
  # Rematerialise ResBlocks and transformer blocks in the backward pass (saves memory).
  c.remat = False

  # ---- network (SPEC section 3) ----
  m = c.model = config_dict.ConfigDict()
  m.in_channels = 4             # FLAIR, T1, T1Gd, T2
  m.num_classes = 4             # NETC/NCR, SNFH/ED, ET, background (independent sigmoids)
  m.init_channels = 16          # c
  m.groups = 8                  # GroupNorm groups
  m.fused_dropout = 0.2
  m.embed_dim = 768             # K
  m.num_heads = 12
  m.num_layers = 12
  m.mlp_dim = 2048
  m.patch_size = 4
  m.kept_blocks = (3, 6, 9, 12)  # 1-based indices of the blocks whose outputs feed the decoder
  m.dropout = 0.1
  m.attention_dropout = 0.1
  # The decoder widths of the UNETR branch: (z12', z9', z6', z3', z0') channels.
  m.decoder_channels = (512, 256, 128, 64, 32)

  # ---- style discriminator ----
  d = c.discriminator = config_dict.ConfigDict()
  d.channels = (64, 128, 256)   # stride-2 stages; fewer are used when the map is small

  # ---- data (see docs/data.md) ----
  dt = c.data = config_dict.ConfigDict()
  dt.root = config_dict.placeholder(str)   # folder of case folders; None = synthetic cases
  dt.layout = 'auto'            # 'auto' | 'brats2024' | 'brats2021' (also FeTS, BraTS 2018-2021)
  dt.input_shape = (160, 192, 128)
  dt.normalization = 'minmax'   # 'minmax' (authors) | 'zscore' (over brain voxels)
  dt.spacing = config_dict.placeholder(float)  # resample to this voxel size in mm; None = keep
  dt.cache_dir = config_dict.placeholder(str)  # None = <workdir>/cache
  dt.split = (0.7, 0.1, 0.2)    # train / validation / test fractions
  dt.split_file = config_dict.placeholder(str)
  dt.split_seed = 0
  dt.workers = 2                # parallel batch builders (0 = none); also cache-build processes
  # 'threads' (in the training process: numpy releases the GIL, batches need no copy; fastest
  # on few cores) | 'processes' (grain multiprocess workers, batches in shared memory).
  dt.worker_kind = 'threads'
  dt.on_bad_case = 'error'      # 'error' | 'skip'
  dt.flips = True
  dt.rotation_degrees = 10.0    # small random rotations (0 disables)
  dt.rotation_prob = 0.0        # probability of rotating a sample (authors: none)
  dt.intensity_scale = 0.1      # multiply by U(1-s, 1+s); 0 disables
  dt.intensity_shift = 0.1      # add U(-s, s); 0 disables
  # Synthetic cases, used when root is None (demo, tests).
  dt.synthetic_cases = 8
  dt.synthetic_shape = (96, 96, 64)
  dt.synthetic_spacing = 1.0     # mm per voxel of the generated cases
  dt.synthetic_layout = 'brats2021'

  # ---- training (SPEC section 5) ----
  t = c.train = config_dict.ConfigDict()
  t.epochs = 250
  t.batch_size_per_device = 1
  # False: the train state is replicated on every device; True: large arrays are split over
  # the devices (ZeRO-3 / FSDP style; saves memory, same results). See docs/scaling.md.
  t.shard_state = False
  t.steps_per_epoch = config_dict.placeholder(int)  # None = number of training cases / batch
  t.learning_rate = 1e-4
  t.b1 = 0.9
  t.b2 = 0.99
  t.weight_decay = 1e-5         # L2 added to the gradient, as PyTorch's Adam does
  t.poly_power = 0.9
  t.disc_learning_rate = 1e-4
  t.disc_b1 = 0.9
  t.disc_b2 = 0.99
  # Modality subsets the student may see, as strings of 0/1 per channel (FLAIR,T1,T1Gd,T2),
  # e.g. ('1111', '1010'); empty = all 15 non-empty subsets, drawn uniformly.
  t.subsets = ()
  t.log_every = 10
  t.checkpoint_every = 500
  t.keep_checkpoints = 3
  t.eval_every_epochs = 10
  t.nan_policy = 'stop'         # 'stop' | 'skip' (skip the update of a non-finite step)

  # ---- losses (SPEC section 4) ----
  l = c.loss = config_dict.ConfigDict()
  l.missing_weight = 0.6        # w_m in L_dice
  l.lambda_mstkd = 1.0
  l.lambda_logit = 1.0
  l.lambda_gsme = 1.0
  l.content_weight = 0.2
  l.evd_alpha = 1e8
  l.mst_beta = 0.2
  l.agreement_on = 'probabilities'   # 'probabilities' (authors) | 'logits' (paper)
  l.agreement_max_weight = 10.0
  l.agreement_rampup_epochs = 20.0
  l.kl_temperature = 7.0
  l.adv_epsilon = 2e-4
  l.style_theta = 1.0
  l.style_scale = 1e-4
  l.stop_gradient_teacher = False
  # Teacher warm-up (not in the paper: 0 and 0): every distillation term is scaled by 0 for
  # the first distill_delay_epochs, then by a linear ramp to 1 over distill_ramp_epochs.
  l.distill_delay_epochs = 0.0
  l.distill_ramp_epochs = 0.0

  # ---- evaluation ----
  e = c.eval = config_dict.ConfigDict()
  e.hd95_convention = 'brats'   # 'brats' (373.13 when one mask is empty) | 'authors' (0)
  e.batch_size = 1              # inputs per compiled forward pass (last batch zero-padded)
  # False: the centre window of input_shape of each case's brain box (SPEC section 5);
  # True: overlapping windows over the whole box, blended (what prediction does).
  e.sliding_window = False
  e.overlap = 0.5               # sliding windows: fraction of a window shared with the next
  e.blend = 'gaussian'          # 'gaussian' (centre-weighted) | 'uniform'
  e.val_subsets = 'all'         # validation during training: 'all' 15 subsets | 'full' only
  e.figure = False              # after training, draw the Figure-2 picture of a test case
  return c


def apply_variant(c, name):
  """Applies one named variant in place."""
  if name == 'tiny':
    c.model.update(init_channels=4, groups=2, embed_dim=32, num_heads=2, num_layers=4,
                   mlp_dim=64, patch_size=2, kept_blocks=(1, 2, 3, 4),
                   decoder_channels=(32, 16, 16, 8, 8))
    c.discriminator.channels = (8, 16)
    c.data.input_shape = (32, 32, 32)
    c.data.synthetic_shape = (40, 40, 36)
    c.data.synthetic_cases = 4
    c.data.workers = 0
    c.train.epochs = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    # Attention products scale like 1/T^2 with T tokens; 8 tokens instead of 120 need a
    # (8/120)^4 smaller alpha to weigh the same as at full size.
    c.loss.evd_alpha = 2e3
  elif name == 'cube64':
    # 64^3 input with the default widths; the UNETR sees 2x2x2 tokens (the authors' 64^3
    # benchmark, REFERENCE_NUMBERS.md) and the discriminator's last kernel shrinks to fit.
    c.data.input_shape = (64, 64, 64)
  elif name == 'no_mstkd':
    c.loss.lambda_mstkd = 0.0
  elif name == 'no_gsme':
    c.loss.lambda_gsme = 0.0
  elif name == 'no_slkd':
    c.loss.lambda_logit = 0.0
  elif name == 'plain':
    c.loss.update(lambda_mstkd=0.0, lambda_gsme=0.0, lambda_logit=0.0, content_weight=0.0)
  elif name:
    raise ValueError(f'unknown config variant {name!r}; known: tiny, cube64, no_mstkd, '
                     'no_gsme, no_slkd, plain')
  return c


def get_config(arg=None):
  c = base_config()
  for name in (arg or '').split(','):
    apply_variant(c, name.strip())
  return c
