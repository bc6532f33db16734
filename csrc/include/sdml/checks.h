#pragma once
// Argument checks for op entry points. Every message names the op and the argument, and the
// exception type maps to the matching Python one (ValueError / TypeError / RuntimeError).
#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>

#define SDML_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

// t must be a floating tensor (float64/float32/float16/bfloat16).
#define SDML_CHECK_FLOATING(op, t)                                                       \
  TORCH_CHECK_TYPE(at::isFloatingType((t).scalar_type()), op, ": " #t                      \
                   " must be a floating-point tensor, got ", (t).scalar_type())

// t must have the given number of dimensions.
#define SDML_CHECK_DIM(op, t, n)                                                          \
  SDML_CHECK_VALUE((t).dim() == (n), op, ": " #t " must be a ", n, "-D tensor, got shape ",\
                   (t).sizes())

// t must have exactly the given shape.
#define SDML_CHECK_SHAPE(op, t, ...)                                                      \
  SDML_CHECK_VALUE((t).sizes() == at::IntArrayRef({__VA_ARGS__}), op, ": " #t              \
                   " must have shape ", at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

// t must live on the same device as ref.
#define SDML_CHECK_DEVICE(op, t, ref)                                                     \
  SDML_CHECK_VALUE((t).device() == (ref).device(), op, ": " #t " is on ", (t).device(),    \
                   " but " #ref " is on ", (ref).device(), "; move them to one device")

// t must have the same dtype as ref.
#define SDML_CHECK_SAME_DTYPE(op, t, ref)                                                 \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(), op, ": " #t " has dtype ",    \
                   (t).scalar_type(), " but " #ref " has dtype ", (ref).scalar_type(),    \
                   "; cast them to one floating dtype")
