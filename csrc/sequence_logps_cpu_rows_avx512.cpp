// The row kernels of sequence_logps_cpu_rows.cpp built for AVX-512 (F, BW, VL, DQ; CMakeLists.txt gives this
// file those flags and CPU_CAPABILITY_AVX512): the same source in namespace cpu_rows::avx512, 16 fp32 lanes.
#include "sequence_logps_cpu_rows.cpp"
