"""C++/CUDA KV-cache extension sources; installed as hallolive_rt.cpp_ext so the package can build it on first use."""
