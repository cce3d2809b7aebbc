#pragma once
// moe::Layer and its pieces (include/moe/layer/): the layer, its cache, the
// expert FFN, the combine, and the default dispatcher.

#include "moe/layer/layer.hpp"
#include "moe/layer/replicated_gradients.hpp"
