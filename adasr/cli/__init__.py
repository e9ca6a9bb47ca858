"""Entry points and the BasicSR glue: option checking, adasr-train/-test, adasr-upscale."""
