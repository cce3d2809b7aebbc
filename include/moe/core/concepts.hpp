#pragma once
// The policy concepts of moe::Layer, one per header.
#include "moe/core/concepts/activation.hpp"
#include "moe/core/concepts/backend.hpp"
#include "moe/core/concepts/dispatch.hpp"
#include "moe/core/concepts/estimator.hpp"
#include "moe/core/concepts/router.hpp"
