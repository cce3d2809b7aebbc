#pragma once
// The safetensors file format (Hugging Face's tensor file format):
//
//   [u64 little-endian N] [N bytes of JSON header] [data buffer]
//
// The header maps each tensor name to {"dtype", "shape", "data_offsets":
// [begin, end]} (offsets into the data buffer) plus an optional
// "__metadata__" object of strings. Safetensors is an in-memory file that was
// validated in full on parse; SafetensorsWriter builds one and writes it
// atomically. Both are independent of the layer: see checkpoint.hpp for that.
// The vocabulary is in format.hpp, the reader in reader.hpp, the writer in
// writer.hpp.
//
// Integrity rules (the reference implementation's, made errors here): the
// header is at most 100 MB and starts with '{'; every entry has a known
// dtype, a non-negative shape and offsets whose length is prod(shape) times
// the element size; the tensors cover the data buffer exactly, without holes,
// overlaps or trailing bytes. Duplicate keys, which JSON parsers silently
// merge, and nesting deeper than 128 levels are rejected too.

#include "moe/io/format.hpp"
#include "moe/io/reader.hpp"
#include "moe/io/writer.hpp"
