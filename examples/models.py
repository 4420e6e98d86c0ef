"""Models for the examples: a small CNN and the SWA paper's CIFAR networks.

All use BatchNormalization, so that the averaged model needs its statistics
recomputed (`keras_swa.update_bn`), as in the paper.
"""

import keras
from keras import layers


def small_cnn(input_shape, num_classes):
    """A small conv net with BatchNorm, for 8x8 to 32x32 images."""
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        if x.shape[1] > 8:
            x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def vgg16_bn(input_shape, num_classes):
    """VGG-16 with BatchNorm, the CIFAR variant of the SWA paper."""
    config = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"]  # fmt: skip
    inputs = keras.Input(input_shape)
    x = inputs
    for item in config:
        if item == "M":
            x = layers.MaxPooling2D()(x)
        else:
            x = layers.Conv2D(item, 3, padding="same")(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
    x = layers.Flatten()(x)
    for _ in range(2):
        x = layers.Dropout(0.5)(x)
        x = layers.Dense(512, activation="relu")(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="vgg16_bn")


def _preact_block(x, filters, stride, bottleneck):
    """One pre-activation residual block (He et al., 2016)."""
    out = layers.ReLU()(layers.BatchNormalization()(x))
    expansion = 4 if bottleneck else 1
    shortcut = x
    if stride != 1 or x.shape[-1] != filters * expansion:
        shortcut = layers.Conv2D(
            filters * expansion, 1, strides=stride, use_bias=False
        )(out)
    if bottleneck:
        out = layers.Conv2D(filters, 1, use_bias=False)(out)
        out = layers.ReLU()(layers.BatchNormalization()(out))
        out = layers.Conv2D(filters, 3, strides=stride, padding="same",
                            use_bias=False)(out)
        out = layers.ReLU()(layers.BatchNormalization()(out))
        out = layers.Conv2D(filters * 4, 1, use_bias=False)(out)
    else:
        out = layers.Conv2D(filters, 3, strides=stride, padding="same",
                            use_bias=False)(out)
        out = layers.ReLU()(layers.BatchNormalization()(out))
        out = layers.Conv2D(filters, 3, padding="same", use_bias=False)(out)
    return layers.Add()([out, shortcut])


def preresnet(depth, input_shape, num_classes):
    """PreResNet-`depth` for CIFAR, as in the SWA paper's reference code:
    bottleneck blocks for depth >= 44 (depth 9n+2: 110, 164), basic blocks
    below (depth 6n+2)."""
    bottleneck = depth >= 44
    divisor = 9 if bottleneck else 6
    if depth < 8 or (depth - 2) % divisor:
        raise ValueError(
            f"PreResNet depth must be {divisor}n+2 here, got {depth}."
        )
    per_stage = (depth - 2) // divisor
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _preact_block(x, filters, stride, bottleneck)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=f"preresnet{depth}")


def wide_resnet(depth, width, input_shape, num_classes, dropout=0.0):
    """WideResNet-`depth`-`width` (Zagoruyko & Komodakis, 2016)."""
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}.")
    per_stage = (depth - 4) // 6
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            out = layers.ReLU()(layers.BatchNormalization()(x))
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = layers.Conv2D(filters, 1, strides=stride,
                                         use_bias=False)(out)
            out = layers.Conv2D(filters, 3, strides=stride, padding="same",
                                use_bias=False)(out)
            out = layers.ReLU()(layers.BatchNormalization()(out))
            if dropout:
                out = layers.Dropout(dropout)(out)
            out = layers.Conv2D(filters, 3, padding="same", use_bias=False)(out)
            x = layers.Add()([out, shortcut])
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=f"wrn{depth}_{width}")


MODELS = {
    "small_cnn": small_cnn,
    "vgg16_bn": vgg16_bn,
    "preresnet110": lambda s, n: preresnet(110, s, n),
    "preresnet164": lambda s, n: preresnet(164, s, n),
    "wrn28_10": lambda s, n: wide_resnet(28, 10, s, n),
}


def get(name, input_shape, num_classes):
    """Builds the model `name` (a key of `MODELS`)."""
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}; choose one of {', '.join(MODELS)}."
        )
    return MODELS[name](tuple(input_shape), num_classes)
