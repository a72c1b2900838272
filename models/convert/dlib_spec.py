"""The C++ type of dlib's face-recognition ResNet as a parser spec (outermost wrapper first).

Transcribed from dlib's ``examples/dnn_face_recognition_ex.cpp``::

    residual<block,N,BN,S>      = add_prev1<block<N,BN,1,tag1<S>>>
    residual_down<block,N,BN,S> = add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,BN,2,tag1<S>>>>>>
    block<N,BN,stride,S>        = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,S>>>>>
    ares<N,S>      = relu<residual<block,N,affine,S>>
    ares_down<N,S> = relu<residual_down<block,N,affine,S>>
    alevel0 = ares_down<256>          alevel1 = ares<256,ares<256,ares_down<256>>>
    alevel2 = ares<128,ares<128,ares_down<128>>>
    alevel3 = ares<64,ares<64,ares<64,ares_down<64>>>>
    alevel4 = ares<32,ares<32,ares<32>>>
    anet_type = loss_metric<fc_no_bias<128,avg_pool_everything<alevel0<alevel1<alevel2<alevel3<
                alevel4<max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input_rgb_image_sized<150>>>>>>>>>>>>>
"""

from __future__ import annotations

from models.convert.dlib_format import SpecNode

FACE_CHIP_SIZE = 150
EMBEDDING_DIM = 128


def _block(filters: int, stride: int) -> list[SpecNode]:
    return [
        SpecNode("layer", "affine"),
        SpecNode("layer", "con", args=(filters, 3, 3, 1, 1)),
        SpecNode("layer", "relu"),
        SpecNode("layer", "affine"),
        SpecNode("layer", "con", args=(filters, 3, 3, stride, stride)),
    ]


def _ares(filters: int) -> list[SpecNode]:
    return [SpecNode("layer", "relu"), SpecNode("layer", "add_prev", tag=1), *_block(filters, 1),
            SpecNode("tag", tag=1)]


def _ares_down(filters: int) -> list[SpecNode]:
    return [
        SpecNode("layer", "relu"),
        SpecNode("layer", "add_prev", tag=2),
        SpecNode("layer", "avg_pool", args=(2, 2, 2, 2)),
        SpecNode("skip", tag=1),
        SpecNode("tag", tag=2),
        *_block(filters, 2),
        SpecNode("tag", tag=1),
    ]


def face_resnet_spec() -> list[SpecNode]:
    """The spec of ``dlib_face_recognition_resnet_model_v1.dat`` (anet_type), outermost first."""
    levels: list[SpecNode] = [
        *_ares_down(256),                                     # alevel0
        *_ares(256), *_ares(256), *_ares_down(256),           # alevel1
        *_ares(128), *_ares(128), *_ares_down(128),           # alevel2
        *_ares(64), *_ares(64), *_ares(64), *_ares_down(64),  # alevel3
        *_ares(32), *_ares(32), *_ares(32),                   # alevel4
    ]
    return [
        SpecNode("loss"),
        SpecNode("layer", "fc", args=(EMBEDDING_DIM,)),
        SpecNode("layer", "avg_pool", args=(0, 0, 1, 1)),  # avg_pool_everything
        *levels,
        SpecNode("layer", "max_pool", args=(3, 3, 2, 2)),
        SpecNode("layer", "relu"),
        SpecNode("layer", "affine"),
        SpecNode("layer", "con", args=(32, 7, 7, 2, 2)),
        SpecNode("input", args=(FACE_CHIP_SIZE, FACE_CHIP_SIZE)),
    ]
