"""Counters of a decoding run: forward passes, denoising steps, tokens and time; TPF and tokens/s."""
import dataclasses


@dataclasses.dataclass
class GenerateStats:
    forward_passes: int = 0    # model calls (prefill, denoising steps and cache writes; a batch counts once)
    denoise_steps: int = 0     # denoising steps summed over sequences
    tokens: int = 0            # tokens generated (outputs' lengths)
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens committed per denoising step of a sequence (TPF)."""
        return self.tokens / self.denoise_steps if self.denoise_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"{self.tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tokens/s), "
                f"{self.denoise_steps} steps, TPF {self.tokens_per_forward:.2f}, {self.forward_passes} forward passes")
