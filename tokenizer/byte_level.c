/* GPT-2's reversible byte -> character map: printable Latin-1 bytes stand for themselves, the
 * other 68 bytes (controls, space, DEL, NBSP, soft hyphen) take U+0100.. in byte order, so every
 * byte string becomes a string of visible characters and back. */
#include <string.h>

#include "tokenizer/tokenizer_internal.h"

static int printable(int b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); }

void cn_byte_level_init(cn_byte_level *bl) {
  memset(bl, 0, sizeof *bl);
  for (int i = 0; i < 512; i++) bl->byte_of[i] = -1;
  int extra = 0;
  for (int b = 0; b < 256; b++) {
    uint32_t cp = printable(b) ? (uint32_t)b : 256u + (uint32_t)extra++;
    bl->len[b] = (uint8_t)cn_utf8_encode(cp, bl->utf8[b]);
    bl->byte_of[cp] = (int16_t)b;
  }
}
