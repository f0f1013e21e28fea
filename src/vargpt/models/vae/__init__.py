"""BSQ multi-scale VAE: conv auto-encoder, pure-function quantiser, scale schedules (SPEC.md §2.6, §2.8, §2.11)."""

from vargpt.models.vae import schedules
from vargpt.models.vae.autoencoder import BSQVAE
from vargpt.models.vae.quantizer import (
    BitFlips,
    BSCResult,
    NoFlips,
    RandomBitFlips,
    RecordedFlips,
    accumulate_codes,
    bits_to_codes,
    bsc_teacher_forcing,
    bsq_quantize,
    codes_to_bits,
    decode_bits,
    multiscale_encode,
    next_scale_input,
)

__all__ = [
    "schedules",
    "BSQVAE",
    "BitFlips",
    "BSCResult",
    "NoFlips",
    "RandomBitFlips",
    "RecordedFlips",
    "bits_to_codes",
    "bsc_teacher_forcing",
    "bsq_quantize",
    "codes_to_bits",
    "decode_bits",
    "multiscale_encode",
    "next_scale_input",
    "accumulate_codes",
]
