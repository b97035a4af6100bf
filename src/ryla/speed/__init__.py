"""The speed layer: what makes the engine's models fast on GPUs, under the engine and knowing
nothing of it (`ryla serve --speed eager|exact|fast|turbo`; ryla.speed.modes applies a mode).

    modes                the speed modes: which tricks each applies, to the transformer and the VAE
    probes               fp8 constants and start-up checks of optional kernels (a leaf module)
    attention            FlashAttention-3 / cuDNN attention, with one kernel preparing Q, K and V
    fp8, fp8_attention   fp8 linear layers and fp8 attention (`fast`)
    blocks               leaner forwards of diffusers' FLUX blocks
    modulation           AdaLayerNorm modulations computed once per image
    vae_norms            the VAE's GroupNorm + SiLU as one kernel, NCHW or channels-last
    kernels              the Triton kernels behind the above
    inductor_heuristics  one-pass row reductions in Inductor's generated code
"""
