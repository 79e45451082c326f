# One option selects a sanitizer build for every target:
#   -DAIMDO_SANITIZE=address   (AddressSanitizer + UndefinedBehaviorSanitizer)
#   -DAIMDO_SANITIZE=thread    (ThreadSanitizer)
set(AIMDO_SANITIZE "" CACHE STRING "Sanitizer build: '', 'address' or 'thread'")
set_property(CACHE AIMDO_SANITIZE PROPERTY STRINGS "" address thread)

if(AIMDO_SANITIZE STREQUAL "address")
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer
                      -fno-sanitize-recover=all)
  add_link_options(-fsanitize=address,undefined)
elseif(AIMDO_SANITIZE STREQUAL "thread")
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
elseif(NOT AIMDO_SANITIZE STREQUAL "")
  message(FATAL_ERROR "AIMDO_SANITIZE must be '', 'address' or 'thread', got '${AIMDO_SANITIZE}'")
endif()
