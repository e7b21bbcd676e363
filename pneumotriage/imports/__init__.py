"""Models brought from elsewhere: a public checkpoint file turned into a self-describing pneumotriage checkpoint
(``pneumotriage convert``), which scan, submit, evaluate and tune then take like their own.

What a converted checkpoint records, beside the weights: the source format and its publisher, the original file's
name and sha256, the output used (index and label among the model's findings), the input pipeline its publisher's
code feeds it (:mod:`pneumotriage.pipelines`; the scan makes exactly that input), the licence note that can be
known, and that it was trained by a third party on real images and has not been validated by pneumotriage. Whether
to use it on patients stays the user's decision: every output says so.

Formats (:data:`FORMATS`; told apart from the file itself, ``format=`` where it cannot be):

- ``xrv-densenet121``: TorchXRayVision ``densenet121-res224-all``, a whole ``nn.Module`` pickled with
  ``torch.save(model)``.
- ``xrv-resnet50``: TorchXRayVision ``resnet50-res512-all``, a torchvision ResNet50 state dict, one input channel.
- ``chexnet``: arnoweng/CheXNet and zoogzog/chexnet ``.pth.tar``: ``{"state_dict": ...}`` saved through
  ``nn.DataParallel`` (``module.densenet121.`` keys, torchvision's old ``norm.1`` layer names, no
  ``num_batches_tracked``), classifier ``Sequential(Linear(1024, 14), Sigmoid())``; TenCrop 224 from 256.
- ``chexnet-jrzech``: jrzech/reproduce-chexnet ``checkpoint``, a pickled dict holding a whole torchvision DenseNet
  under ``model``; centre crop 224.
- ``chexnet-keras``: brucechou1983/CheXNet-Keras (the original case study's classifier base), Keras 2 HDF5
  weights (``layer_names`` on the root, or under ``model_weights`` in a whole-model file): Keras 2.1.4's
  DenseNet121 (no ReLU after its last batch norm) and a ``Dense(14, sigmoid)`` named ``predictions``; read with
  h5py (the ``keras`` extra), kernels HWIO to OIHW, Keras's batch-norm epsilon folded into the variances.
- ``smp-unet``, ``smp-unet-2019``, ``smp-unetplusplus``, ``smp-pretrained``: a segmentation_models_pytorch
  ``Unet`` or ``UnetPlusPlus`` (encoders resnet34, resnet50, vgg19, vgg19_bn, densenet121, told from the tensors)
  as a state dict (``encoder.*``, ``decoder.blocks.N.conv1.0.weight`` or ``decoder.blocks.x_D_L...``,
  ``segmentation_head.0.*``; bare or under ``state_dict``), a Unet in smp <= 0.0.3's layout
  (``decoder.layer1.block.0.block.0.weight``, ``decoder.final_conv``), or a ``save_pretrained`` folder
  (``config.json`` + ``model.safetensors``, read here as plain data).

A whole-module pickle never runs code from the file: it is read by torch's weights-only unpickler with each class
these formats contain mapped onto an inert stand-in that only keeps its attributes (:class:`StandIn`); any other
global (``os.system``, ``builtins.eval``, a class of another package) is refused before anything is built.

The modules: :mod:`~pneumotriage.imports.formats` (what each format is), :mod:`~pneumotriage.imports.unpickle`,
:mod:`~pneumotriage.imports.keras` and :mod:`~pneumotriage.imports.sources` (reading a file's tensors), and
:mod:`~pneumotriage.imports.conversion` (writing the checkpoint). What the rest of the package uses is named here.
"""

from pneumotriage.imports.conversion import GENERIC_FORMATS, Converted, convert, convert_program
from pneumotriage.imports.formats import CHESTXRAY14_LABELS, FORMATS, XRV_LABELS
from pneumotriage.imports.keras import KerasWeights
from pneumotriage.imports.sources import detect
from pneumotriage.imports.unpickle import StandIn, load_restricted

__all__ = [
    "CHESTXRAY14_LABELS",
    "Converted",
    "FORMATS",
    "GENERIC_FORMATS",
    "KerasWeights",
    "StandIn",
    "XRV_LABELS",
    "convert",
    "convert_program",
    "detect",
    "load_restricted",
]
