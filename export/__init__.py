"""Static-shape exporters (ONNX, TensorRT, AOTInductor) and their manifest; installed as hallolive_rt.export."""
