"""The public checkpoints' formats: what each file holds, whose it is, the outputs it gives and the input
pipeline its publisher's code feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: TorchXRayVision's ``datasets.default_pathologies``: its models' 18 outputs, in order.
XRV_LABELS = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
#: ChestX-ray14's 14 findings in CheXNet's output order.
CHESTXRAY14_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


@dataclass(frozen=True)
class SourceFormat:
    """One public checkpoint format: what it is, whose it is, and how its publisher's code runs it."""

    name: str
    title: str
    publisher: str
    licence: str
    arch: str
    labels: tuple[str, ...]
    input_size: int
    pipeline: str
    normalisation: str
    crops: str = "none"
    crop_size: int = 0
    #: The publisher's operating point for the Pneumothorax output, where one is published.
    operating_point: float | None = None
    evaluation: str = ""
    kind: str = "classifier"

    @property
    def output_index(self) -> int:
        return self.labels.index("Pneumothorax")


FORMATS: dict[str, SourceFormat] = {
    f.name: f
    for f in (
        SourceFormat(
            "xrv-densenet121",
            "TorchXRayVision densenet121-res224-all (a pickled whole model)",
            "https://github.com/mlmed/torchxrayvision",
            "Apache-2.0 (TorchXRayVision, Cohen et al., MIDL 2022)",
            "densenet121",
            XRV_LABELS,
            224,
            "xrv",
            "unit",
            operating_point=0.0098118475,
            evaluation="one 224 px view; op_threshs[3] = 0.0098118475",
        ),
        SourceFormat(
            "xrv-resnet50",
            "TorchXRayVision resnet50-res512-all (a state dict)",
            "https://github.com/mlmed/torchxrayvision",
            "Apache-2.0 (TorchXRayVision, Cohen et al., MIDL 2022)",
            "resnet50",
            XRV_LABELS,
            512,
            "xrv",
            "unit",
            operating_point=0.50723547,
            evaluation="one 512 px view; op_threshs[3] = 0.50723547",
        ),
        SourceFormat(
            "chexnet",
            "CheXNet in PyTorch, arnoweng/CheXNet or zoogzog/chexnet (.pth.tar)",
            "https://github.com/arnoweng/CheXNet",
            "none stated (arnoweng/CheXNet has no licence file): ask the publisher before any use",
            "densenet121",
            CHESTXRAY14_LABELS,
            256,
            "png8",
            "imagenet-rgb",
            crops="ten",
            crop_size=224,
            evaluation="Resize(256), TenCrop(224), the ten probabilities averaged",
        ),
        SourceFormat(
            "chexnet-jrzech",
            "CheXNet reproduced, jrzech/reproduce-chexnet (a pickled dict holding the model)",
            "https://github.com/jrzech/reproduce-chexnet",
            "BSD-3-Clause (jrzech/reproduce-chexnet)",
            "densenet121",
            CHESTXRAY14_LABELS,
            224,
            "png8",
            "imagenet-rgb",
            evaluation="Resize(224), CenterCrop(224)",
        ),
        SourceFormat(
            "chexnet-keras",
            "CheXNet-Keras, brucechou1983/CheXNet-Keras (Keras 2 HDF5 weights)",
            "https://github.com/brucechou1983/CheXNet-Keras",
            "MIT (brucechou1983/CheXNet-Keras)",
            "densenet121_keras",
            CHESTXRAY14_LABELS,
            224,
            "png8-skimage",
            "imagenet-rgb",
            evaluation="one 224 px view of the whole image (its generator: RGB /255, skimage resize, ImageNet "
            "mean/std)",
        ),
        *(
            SourceFormat(
                name,
                title,
                "https://github.com/qubvel-org/segmentation_models_pytorch (the network trained by whoever saved it)",
                "that of whoever trained it (segmentation_models_pytorch itself is MIT): ask them",
                arch,
                ("Pneumothorax",),
                512,
                "png8-square",
                "imagenet-rgb",
                evaluation="one view, the whole image resized to the model's square",
                kind="segmenter",
            )
            for name, arch, title in (
                ("smp-unet", "smp_unet", "segmentation_models_pytorch Unet (a state dict)"),
                (
                    "smp-unet-2019",
                    "smp_unet",
                    "segmentation_models_pytorch <= 0.0.3 Unet (a state dict of the 2019 layout)",
                ),
                ("smp-unetplusplus", "smp_unetplusplus", "segmentation_models_pytorch UnetPlusPlus (a state dict)"),
                (
                    "smp-pretrained",
                    "smp_unet",
                    "segmentation_models_pytorch Unet or UnetPlusPlus (a save_pretrained folder)",
                ),
            )
        ),
    )
}

#: The classes a whole-module pickle of these formats holds, by the path it names them with.
PICKLED_CLASSES = (
    "torchxrayvision.models.DenseNet",
    "torchxrayvision.models._DenseBlock",
    "torchxrayvision.models._DenseLayer",
    "torchxrayvision.models._Transition",
    "torchvision.models.densenet.DenseNet",
    "torchvision.models.densenet._DenseBlock",
    "torchvision.models.densenet._DenseLayer",
    "torchvision.models.densenet._Transition",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.Sigmoid",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.flatten.Flatten",
)
