"""MST-KDNet on BraTS 2024 GLI: the paper's defaults (docs/method.md).

Variants by argument: ``--config=brats:VARIANT`` (from a checkout also
``--config=configs/brats.py:VARIANT``) with VARIANT one of
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

  # ---- network (docs/method.md, "Network") ----
  model = c.model = config_dict.ConfigDict()
  model.in_channels = 4             # FLAIR, T1, T1Gd, T2
  model.num_classes = 4             # NETC/NCR, SNFH/ED, ET, background (independent sigmoids)
  model.init_channels = 16          # c
  model.groups = 8                  # GroupNorm groups
  model.fused_dropout = 0.2
  model.embed_dim = 768             # K
  model.num_heads = 12
  model.num_layers = 12
  model.mlp_dim = 2048
  model.patch_size = 4
  model.kept_blocks = (3, 6, 9, 12)  # 1-based indices of the blocks whose outputs feed the decoder
  model.dropout = 0.1
  model.attention_dropout = 0.1
  # The decoder widths of the UNETR branch: (z12', z9', z6', z3', z0') channels.
  model.decoder_channels = (512, 256, 128, 64, 32)

  # ---- style discriminator ----
  disc = c.discriminator = config_dict.ConfigDict()
  # Channels of the stride-2 (k4 s2 p1) stages; a style map too small for them is refused:
  # give fewer or narrower stages (configs/cpu_real.py uses two).
  disc.channels = (64, 128, 256)

  # ---- data (see docs/data.md) ----
  data = c.data = config_dict.ConfigDict()
  data.root = config_dict.placeholder(str)   # folder of case folders; None = synthetic cases
  data.layout = 'auto'            # 'auto' | 'brats2024' | 'brats2021' (also FeTS, BraTS 2018-2021)
  data.input_shape = (160, 192, 128)
  data.normalization = 'minmax'   # 'minmax' (authors) | 'zscore' (over brain voxels)
  data.spacing = config_dict.placeholder(float)  # resample to this voxel size in mm; None = keep
  data.cache_dir = config_dict.placeholder(str)  # None = <workdir>/cache
  data.split = (0.7, 0.1, 0.2)    # train / validation / test fractions
  data.split_file = config_dict.placeholder(str)
  data.split_seed = 0
  data.workers = 2                # parallel batch builders (0 = none); also cache-build processes
  # 'threads' (in the training process: numpy releases the GIL, batches need no copy; fastest
  # on few cores) | 'processes' (grain multiprocess workers, batches in shared memory).
  data.worker_kind = 'threads'
  data.on_bad_case = 'error'      # 'error' | 'skip'
  data.flips = True
  data.rotation_degrees = 10.0    # small random rotations (0 disables)
  data.rotation_prob = 0.0        # probability of rotating a sample (authors: none)
  data.intensity_scale = 0.1      # multiply by U(1-s, 1+s); 0 disables
  data.intensity_shift = 0.1      # add U(-s, s); 0 disables
  # Synthetic cases, used when root is None (demo, tests).
  data.synthetic_cases = 8
  data.synthetic_shape = (96, 96, 64)
  data.synthetic_spacing = 1.0     # mm per voxel of the generated cases
  data.synthetic_layout = 'brats2021'

  # ---- training (docs/method.md, "Optimisation and data") ----
  train = c.train = config_dict.ConfigDict()
  train.epochs = 250
  train.batch_size_per_device = 1
  # False: the train state is replicated on every device; True: large arrays are split over
  # the devices (ZeRO-3 / FSDP style; saves memory, same results). See docs/scaling.md.
  train.shard_state = False
  train.steps_per_epoch = config_dict.placeholder(int)  # None = number of training cases / batch
  train.learning_rate = 1e-4
  train.b1 = 0.9
  train.b2 = 0.99
  train.weight_decay = 1e-5         # L2 added to the gradient, as PyTorch's Adam does
  train.poly_power = 0.9
  train.disc_learning_rate = 1e-4
  train.disc_b1 = 0.9
  train.disc_b2 = 0.99
  # Modality subsets the student may see, as strings of 0/1 per channel (FLAIR,T1,T1Gd,T2),
  # e.g. ('1111', '1010'); empty = all 15 non-empty subsets, drawn uniformly.
  train.subsets = ()
  # How the student's subset is drawn among them (not in the paper): 'uniform', or 'size'
  # (in proportion to the number of modalities present: the full input 4 times as often as a
  # single modality; see docs/training.md).
  train.subset_weighting = 'uniform'
  train.log_every = 10
  train.checkpoint_every = 500
  train.keep_checkpoints = 3
  train.eval_every_epochs = 10
  train.nan_policy = 'stop'         # 'stop' | 'skip' (skip the update of a non-finite step)
  # Offline distillation (not in the paper, which trains both networks together): a training
  # workdir or an exported network whose weights the teacher starts from and keeps (the
  # teacher is not trained). None: the teacher is initialised afresh and trained.
  train.frozen_teacher = config_dict.placeholder(str)
  # Which network of that workdir becomes the teacher: 'student' (None) or 'teacher'.
  train.frozen_teacher_network = config_dict.placeholder(str)

  # ---- losses (docs/method.md, "Losses") ----
  loss = c.loss = config_dict.ConfigDict()
  loss.missing_weight = 0.6        # w_m in L_dice
  loss.lambda_mstkd = 1.0
  loss.lambda_logit = 1.0
  loss.lambda_gsme = 1.0
  loss.content_weight = 0.2
  loss.evd_alpha = 1e8
  loss.mst_beta = 0.2
  loss.agreement_on = 'probabilities'   # 'probabilities' (authors) | 'logits' (paper)
  loss.agreement_max_weight = 10.0
  loss.agreement_rampup_epochs = 20.0
  loss.kl_temperature = 7.0
  loss.adv_epsilon = 2e-4
  loss.style_theta = 1.0
  loss.style_scale = 1e-4
  loss.stop_gradient_teacher = False
  # Teacher warm-up (not in the paper: 0 and 0): every distillation term is scaled by 0 for
  # the first distill_delay_epochs, then by a linear ramp to 1 over distill_ramp_epochs.
  loss.distill_delay_epochs = 0.0
  loss.distill_ramp_epochs = 0.0
  # Superset consistency (not in the paper): each step the student also sees a subset one
  # modality away from its own, and a region (WT / TC / ET) whose soft Dice loss is worse from
  # the larger input than from the smaller is penalised by this weight times the excess
  # (losses.superset_consistency_loss; a second student forward and backward pass per step).
  loss.superset_weight = 0.0

  # ---- evaluation ----
  evaluation = c.eval = config_dict.ConfigDict()
  evaluation.hd95_convention = 'brats'   # 'brats' (373.13 when one mask is empty) | 'authors' (0)
  evaluation.batch_size = 1              # inputs per compiled forward pass (last batch zero-padded)
  # False: the centre window of input_shape of each case's brain box (the paper's protocol);
  # True: overlapping windows over the whole box, blended (what prediction does).
  evaluation.sliding_window = False
  evaluation.overlap = 0.5               # sliding windows: fraction of a window shared with the next
  evaluation.blend = 'gaussian'          # 'gaussian' (centre-weighted) | 'uniform'
  evaluation.val_subsets = 'all'         # validation during training: 'all' 15 subsets | 'full' only
  evaluation.figure = False              # after training, draw the Figure-2 picture of a test case
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
    # 64^3 input with the default widths; the UNETR sees 2x2x2 tokens (the size of the
    # authors' 64^3 training benchmark, experiments/bench_vs_torch.py) and the
    # discriminator's last kernel shrinks to fit.
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
