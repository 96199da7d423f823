// ESLint (flat config): JavaScript's and typescript-eslint's recommended rules on the sources and
// tests; formatting is prettier's (npm run lint checks both, and the types with tsc).
import js from '@eslint/js';
import prettier from 'eslint-config-prettier';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['lib/', 'build/', 'node_modules/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  prettier,
  {
    files: ['**/*.{ts,tsx}'],
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { args: 'none', ignoreRestSiblings: true }],
      eqeqeq: 'error',
      curly: 'error'
    }
  }
);
