# Strict warnings for aimdo's own targets (not for nanobind's sources).
option(AIMDO_WERROR "Treat warnings as errors" OFF)

function(aimdo_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wconversion -Wsign-conversion
                                             -Wshadow -Wnon-virtual-dtor -Wpedantic)
    if(AIMDO_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()
