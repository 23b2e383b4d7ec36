"""Static shape / precision presets and Nsight session presets (TOML data), installed as hallolive_rt.profiles."""
