"""Settings shared by every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD), built once from the flags."""
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

    @classmethod
    def from_args(cls, args) -> "LocalSGDConfig":
        return cls(args.local_sgd_sync_interval, args.local_sgd_warmup_iters, args.outer_lr, args.outer_momentum,
                   args.outer_nesterov, args.offload_outer_state, args.sync_dtype, args.sync_error_feedback,
                   args.sync_delay_steps)

    def is_warmup(self, iteration: int) -> bool:
        return iteration <= self.warmup_iters

    def is_sync_iteration(self, iteration: int) -> bool:
        """Iteration t synchronizes in its first forward when H local steps have passed since the last sync."""
        local_steps_done = iteration - 1 - self.warmup_iters
        return local_steps_done > 0 and local_steps_done % self.sync_interval == 0

    def syncs_after(self, iteration: int) -> bool:
        """Modes that synchronize at the end of a step (DiLoCo, Post-Local-SGD) do so after iteration t when
        the next one is a sync iteration: the same parameters EDiT's next forward sees."""
        return self.is_sync_iteration(iteration + 1)
