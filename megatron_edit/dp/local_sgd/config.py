"""Settings shared by every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD), built once from the flags;
when they sync is schedule.py's."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class LocalSGDConfig:
    sync_interval: int          # H: local steps between synchronizations
    warmup_iters: int           # W: plain synchronous data-parallel iterations before local steps begin
    outer_lr: float
    outer_momentum: float
    outer_nesterov: bool
    offload_outer_state: bool   # keep anchor and momentum in (pinned) CPU memory
    sync_dtype: str = "fp32"    # what the pseudo-gradient exchange puts on the wire (exchange.py)
    sync_error_feedback: bool = False
    sync_delay_steps: int = 0   # tau: iterations between issuing a sync's exchange and applying its outer step
    sync_fragments: int = 1     # F: groups of modules that sync at staggered iterations (edit/fragments.py)
    initial_sync_interval: int = 0  # H0: the first interval, doubled at each sync up to H (0: every interval is H)
    warmup_grad_dtype: str = "fp32"  # what the warm-up's gradient average over the replicas sends (exchange.py)
    topk_fraction: float = 0.01  # the share of values a topk codec sends
    local_lr_scale: float = 1.0  # the inner LR schedule's factor during local steps (inner_lr.py)

    @classmethod
    def from_args(cls, args) -> "LocalSGDConfig":
        return cls(args.local_sgd_sync_interval, args.local_sgd_warmup_iters, args.outer_lr, args.outer_momentum,
                   args.outer_nesterov, args.offload_outer_state, args.sync_dtype, args.sync_error_feedback,
                   args.sync_delay_steps, args.sync_fragments, args.local_sgd_initial_sync_interval or 0,
                   args.local_sgd_warmup_grad_dtype, args.sync_topk_fraction, args.local_sgd_lr_scale)


@dataclasses.dataclass(frozen=True)
class RecipeDefaults:
    """What a mode's own flags mean when not given: each mode is shipped at the setting measured best for it
    (docs/low_communication.md, "The shipped defaults and where their bytes go")."""
    sync_interval: int          # --local-sgd-sync-interval
    outer_lr: float             # --outer-lr
    outer_momentum: float       # --outer-momentum
    outer_nesterov: bool        # --outer-nesterov
    sync_dtype: str             # --sync-dtype (with error feedback unless fp32)
    lr_scale_exponent: float    # --local-sgd-lr-scale is M ** this, M the replicas,
    lr_scale_cap: float = float("inf")  # but at most this

    def lr_scale(self, replicas: int) -> float:
        """--local-sgd-lr-scale for M replicas."""
        return round(min(replicas ** self.lr_scale_exponent, self.lr_scale_cap), 4)

    def fill(self, args, replicas: int) -> None:
        """Sets every flag of these the user left out (None)."""
        values = {"local_sgd_sync_interval": self.sync_interval, "outer_lr": self.outer_lr,
                  "outer_momentum": self.outer_momentum, "outer_nesterov": self.outer_nesterov,
                  "sync_dtype": self.sync_dtype, "local_sgd_lr_scale": self.lr_scale(replicas)}
        for name, value in values.items():
            if getattr(args, name) is None:
                setattr(args, name, value)


# The outer Nesterov step every 16 local steps, tuned on the benchmark corpus (docs/baselines.md), syncs in int4: for
# syncs that are many steps apart (DiLoCo; A-EDiT, whose clock spaces them; replica jobs, which meet in a quorum).
SIXTEEN_STEP_RECIPE = RecipeDefaults(sync_interval=16, outer_lr=0.7, outer_momentum=0.8, outer_nesterov=True,
                                     sync_dtype="int4", lr_scale_exponent=0.0)
# The same in fp32, where only an all-reduce carries the sync: Post-Local-SGD's parameter average, torchft's quorum.
SIXTEEN_STEP_FP32_RECIPE = dataclasses.replace(SIXTEEN_STEP_RECIPE, sync_dtype="fp32")
# Every other step, the replicas' 2-bit pseudo-gradients averaged (outer LR 1, no momentum), local steps at M times
# the LR: -0.5% (M=2) and +1.5% (M=4) against DDP's loss for 1/24 of its bytes over the whole run, warm-up included.
# The scale stops at 4: at M=8, 8 overshot 4.76 (docs/low_communication.md, "Local Adam at M=4").
EVERY_OTHER_STEP_RECIPE = RecipeDefaults(sync_interval=2, outer_lr=1.0, outer_momentum=0.0, outer_nesterov=False,
                                         sync_dtype="int2", lr_scale_exponent=1.0, lr_scale_cap=4.0)
